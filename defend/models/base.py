"""The interface both model families share: collate, loss, generate."""
from __future__ import annotations

import inspect
from functools import cached_property
from typing import Any

import torch

from defend.config import Config
from defend.data.collate import Collator
from defend.models.archs import architecture
from defend.models.scoring import ResponseScores
from defend.models.vision_tokens import VisionTokens, capture, image_positions, injected, without

NOT_MODEL_INPUTS = ("sample_ids", "labels", "image_rows")


class VisionLanguageModel:
    """A Hugging Face vision-language model plus what a recipe needs around it.

    Subclasses define the training loss and the sampler of their family.
    """

    family: str = ""

    def __init__(self, model: torch.nn.Module, processor: Any, cfg: Config):
        self.model = model
        self.processor = processor
        self.cfg = cfg
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.arch = architecture(self.base_model.config)

    def train_collator(self) -> Collator:
        return Collator(self.processor, self.cfg.train.max_length, with_response=True)

    def generate_collator(self) -> Collator:
        return Collator(self.processor, self.cfg.train.max_length, with_response=False, padding_side="left")

    @staticmethod
    def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS}

    def score(self, batch: dict[str, Any], model: torch.nn.Module | None = None, views: int = 1) -> ResponseScores:
        """One forward of a training batch (``views`` stacked copies of its rows); ``model`` is the
        module to call (e.g. a DeepSpeed engine)."""
        raise NotImplementedError

    @cached_property
    def takes_logits_to_keep(self) -> bool:
        return "logits_to_keep" in inspect.signature(self.base_model.forward).parameters

    def last_logits(self, model: torch.nn.Module, inputs: dict[str, Any], keep: int) -> torch.Tensor:
        """(B, keep, V): the logits of the last ``keep`` positions. Where the model's forward takes
        ``logits_to_keep`` (LLaVA, Qwen2-VL, PaliGemma, ...) the LM head runs on those positions only:
        on a 150k vocabulary the full (B, L, V) logits would be most of a step's memory. Other models
        (BLIP-2) compute them all and are sliced."""
        if self.takes_logits_to_keep:
            return model(**inputs, logits_to_keep=keep).logits
        return model(**inputs).logits[:, -keep:]

    def loss(self, batch: dict[str, Any], model: torch.nn.Module | None = None) -> torch.Tensor:
        """The family's task loss of one batch."""
        return self.score(batch, model).task_loss()

    def generate(self, batch: dict[str, Any], features: torch.Tensor | None = None) -> list[str]:
        """Greedy answers for a left-padded prompt batch; ``features`` replaces the batch's vision
        tokens (``image_features`` with some rows masked: DiSP)."""
        raise NotImplementedError

    def first_step_logits(self, batch: dict[str, Any], features: torch.Tensor) -> torch.Tensor:
        """(B, P, V): the output distribution of the first generation step, at its P positions, with
        ``features`` as the vision tokens (differentiable with respect to them)."""
        raise NotImplementedError

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformers model (under a peft wrapper, if any)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def image_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        return image_positions(input_ids, self.arch.image_token_id(self.base_model.config))

    def vision_tokens(self, batch: dict[str, Any]) -> VisionTokens:
        """The batch's vision tokens as they enter the language model (no gradient to the weights is
        kept unless the caller enables it); none for a text-only batch."""
        positions = self.image_positions(batch["input_ids"])
        if not positions.any():
            hidden = self.base_model.config.get_text_config().hidden_size
            return VisionTokens(torch.empty(0, hidden), [])
        inputs = self.model_inputs(batch)
        return capture(self.arch.language_model(self.base_model), positions, lambda: self.base_model(**inputs))

    def image_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """(N, hidden): the batch's vision tokens, flat (``vision_tokens`` with their per-image counts)."""
        return self.vision_tokens(batch).features

    def injected_vision_tokens(self, positions: torch.Tensor, features: torch.Tensor):
        """Context: calls of the model inside it see ``features`` (N, hidden) at ``positions`` (B, L)."""
        return injected(self.arch.language_model(self.base_model), positions, features)

    def inputs_without_pixels(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model inputs of a call whose vision tokens are injected (the vision tower need not run)."""
        inputs = self.model_inputs(batch)
        return inputs if self.arch.keeps_pixels() else without(inputs, self.arch.pixel_inputs)

    def prompt_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``inputs_without_pixels`` of a left-padded prompt batch, positioned as generate's prefill is."""
        inputs = self.inputs_without_pixels(batch)
        positions = self.arch.position_ids(batch["attention_mask"])
        if positions is not None:  # None: the model derives them (M-RoPE)
            inputs["position_ids"] = positions
        return inputs

    def token_embedding(self, token_id: int) -> torch.Tensor:
        """The input embedding of one token, (hidden,)."""
        table = self.model.get_input_embeddings()
        return table(torch.tensor([token_id], device=table.weight.device))[0]

    def answer_end_ids(self) -> set[int]:
        """The tokens an answer ends at."""
        return {self.tokenizer.eos_token_id}

    @staticmethod
    def answer_room(cfg: Config) -> int:
        """The most answer tokens one generation holds under ``cfg``."""
        return cfg.eval.max_new_tokens

    @staticmethod
    def room_for(n: int) -> str:
        """The settings under which one generation holds ``n`` answer tokens."""
        return f"eval.max_new_tokens={n}"

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Text up to the first token that ends an answer, in each row."""
        ends = self.answer_end_ids()
        texts = []
        for row in tokens.tolist():
            row = row[: next((i for i, t in enumerate(row) if t in ends), len(row))]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts
