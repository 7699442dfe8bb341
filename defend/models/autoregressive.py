"""Autoregressive MLLMs (LLaVA, BLIP-2, Qwen2-VL, PaliGemma, ...) through transformers' classes."""
from __future__ import annotations

from typing import Any

import torch

from defend.data.collate import IGNORE_INDEX
from defend.models.base import VisionLanguageModel
from defend.models.scoring import ResponseScores


class AutoregressiveVLM(VisionLanguageModel):
    family = "mllm"

    def score(self, batch: dict[str, Any], model: torch.nn.Module | None = None, views: int = 1) -> ResponseScores:
        """Next-token scores of the response; the task loss is the mean CE over view 0's response tokens
        (what the model's own ``labels=`` loss computes)."""
        model = model or self.model
        logits = model(**self.model_inputs(batch)).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        scored = targets[: targets.shape[0] // views] != IGNORE_INDEX
        weight = scored.float() / scored.sum().clamp(min=1)
        return ResponseScores(logits, targets, weight, views)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> list[str]:
        inputs = self.model_inputs(batch)
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return self.decode(out[:, inputs["input_ids"].shape[1]:])
