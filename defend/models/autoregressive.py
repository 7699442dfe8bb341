"""Autoregressive MLLMs (LLaVA, BLIP-2, Qwen2-VL, PaliGemma, ...) through transformers' classes."""
from __future__ import annotations

from typing import Any

import torch

from defend.models.base import VisionLanguageModel


class AutoregressiveVLM(VisionLanguageModel):
    family = "mllm"

    def loss(self, batch: dict[str, Any], model: torch.nn.Module | None = None) -> torch.Tensor:
        model = model or self.model
        return model(**self.model_inputs(batch), labels=batch["labels"]).loss

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
