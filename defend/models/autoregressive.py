"""Autoregressive MLLMs (LLaVA, BLIP-2, Qwen2-VL, PaliGemma, ...) through transformers' classes."""
from __future__ import annotations

from typing import Any

import torch

from defend.data.collate import IGNORE_INDEX
from defend.models.base import VisionLanguageModel
from defend.models.scoring import ResponseScores, response_start


class AutoregressiveVLM(VisionLanguageModel):
    family = "mllm"

    def score(self, batch: dict[str, Any], model: torch.nn.Module | None = None, views: int = 1) -> ResponseScores:
        """Next-token scores of the response; the task loss is the mean CE over view 0's response tokens
        (what the model's own ``labels=`` loss computes)."""
        model = model or self.model
        targets = batch["labels"][:, 1:]
        start = response_start(targets != IGNORE_INDEX)
        logits = self.last_logits(model, self.model_inputs(batch), targets.shape[1] + 1 - start)[:, :-1]
        targets = targets[:, start:]
        scored = targets[: targets.shape[0] // views] != IGNORE_INDEX
        weight = scored.float() / scored.sum().clamp(min=1)
        return ResponseScores(logits, targets, weight, views)

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], features: torch.Tensor | None = None) -> list[str]:
        settings = dict(max_new_tokens=self.cfg.eval.max_new_tokens, do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if features is None:
            inputs = self.model_inputs(batch)
            out = self.model.generate(**inputs, **settings)
        else:  # the model's own generate, its prefill seeing ``features`` as the vision tokens
            inputs = self.inputs_without_pixels(batch)
            with self.injected_vision_tokens(self.image_positions(batch["input_ids"]), features):
                out = self.model.generate(**inputs, **settings)
        return self.decode(out[:, inputs["input_ids"].shape[1]:])

    def first_step_logits(self, batch: dict[str, Any], features: torch.Tensor) -> torch.Tensor:
        with self.injected_vision_tokens(self.image_positions(batch["input_ids"]), features):
            return self.last_logits(self.model, self.prompt_inputs(batch), 1)
