"""The interface both model families share: collate, loss, generate."""
from __future__ import annotations

import inspect
from functools import cached_property
from typing import Any

import torch

from defend.config import Config
from defend.data.collate import Collator
from defend.models.scoring import ResponseScores

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
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "logits_to_keep" in inspect.signature(base.forward).parameters

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

    def image_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Projected vision tokens of the batch's images, (n_images * tokens_per_image, hidden), in the
        order the image placeholders appear; empty for a text-only batch. LLaVA-style models."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if "pixel_values" not in batch:
            return torch.empty(0, base.config.get_text_config().hidden_size)
        get = getattr(base.model, "get_image_features", None)
        if get is None:
            raise NotImplementedError(f"{type(base).__name__} has no get_image_features: vision-token access"
                                      " needs a LLaVA-style model")
        out = get(pixel_values=batch["pixel_values"], return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image placeholders replaced by ``image_features``."""
        embeds = self.model.get_input_embeddings()(input_ids)
        image_positions = (input_ids == self.model.config.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(image_positions, image_features.to(embeds.dtype))

    def token_embedding(self, token_id: int) -> torch.Tensor:
        """The input embedding of one token, (hidden,)."""
        table = self.model.get_input_embeddings()
        return table(torch.tensor([token_id], device=table.weight.device))[0]

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Text up to the first eos of each row."""
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in tokens.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts
