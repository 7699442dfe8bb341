"""The interface both model families share: collate, loss, generate."""
from __future__ import annotations

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

    def loss(self, batch: dict[str, Any], model: torch.nn.Module | None = None) -> torch.Tensor:
        """The family's task loss of one batch."""
        return self.score(batch, model).task_loss()

    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Greedy answers for a left-padded prompt batch."""
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Text up to the first eos of each row."""
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in tokens.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts
