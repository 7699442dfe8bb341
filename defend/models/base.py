"""The interface both model families share: collate, loss, generate."""
from __future__ import annotations

from typing import Any

import torch

from defend.config import Config
from defend.data.collate import Collator
from defend.models.vision import find_vision_tower

NOT_MODEL_INPUTS = ("sample_ids", "labels")


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

    def loss(self, batch: dict[str, Any], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Task loss of one batch; ``model`` is the module to call (e.g. a DeepSpeed engine)."""
        raise NotImplementedError

    def blank_image_inputs(self) -> dict[str, torch.Tensor]:
        """The image processor's tensors for one black image (built once)."""
        if not hasattr(self, "_blank_image_inputs"):
            from PIL import Image

            blank = Image.new("RGB", (224, 224))
            self._blank_image_inputs = dict(self.processor.image_processor(images=[blank], return_tensors="pt"))
        return self._blank_image_inputs

    def vision_guard(self, batch: dict[str, Any]) -> torch.Tensor | float:
        """0, computed through the vision side when ``batch`` has no image; add it to the loss.

        Under ZeRO-3 the ranks gather each layer's weights together as they reach it: a rank whose
        batch is all text would skip the vision tower while the others wait in it, and hang. So a
        text-only batch still runs the vision encoder and projector on one black image, weighted 0
        (no effect on the loss or the gradients).
        """
        if "pixel_values" in batch:
            return 0.0
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        weight = next(find_vision_tower(base).parameters())
        inputs = {k: v.to(weight.device, weight.dtype if v.is_floating_point() else v.dtype)
                  for k, v in self.blank_image_inputs().items()}
        features = base.get_image_features(**inputs)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            features = torch.cat([f.reshape(-1) for f in features])
        return 0.0 * features.float().sum()

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
