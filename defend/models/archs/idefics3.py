"""Idefics3 / SmolVLM (``idefics3``): a SigLIP-style encoder over the image split into crops plus a
global view, pixel-shuffled by ``scale_factor`` and projected by a connector; ``pixel_values``
(N, crops, C, H, W) with a ``pixel_attention_mask``."""
from __future__ import annotations

from typing import Any

import torch

from defend.models.archs.base import AnyResArchitecture
from defend.models.archs.llava import tiny_text_config
from defend.models.tiny_components import tiny_tokenizer, vision_dims

SCALE = 2  # pixel shuffle: each 2x2 block of patches becomes one image token
# atomic in the published tokenizers: the crop markers the processor writes around each crop's tokens
TOKENS = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
          "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
          **{f"row_{r}_col_{c}_token": f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)}}


class Idefics3(AnyResArchitecture):
    model_type = "idefics3"
    tiny_arch = "idefics3"
    diffusion = True
    vision_tower = "vision_model"
    projector = ("connector",)
    pixel_inputs = ("pixel_values", "pixel_attention_mask")

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.model.text_model

    def process_images(self, image_processor: Any, images: list) -> dict[str, torch.Tensor]:
        return super().process_images(image_processor, [[image] for image in images])  # a flat list is one sample

    def whole_image(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """The global view: the last real crop (crops are padded with zeros that the mask leaves out)."""
        real = pixels["pixel_attention_mask"].flatten(2).any(-1)  # (N, crops)
        last = real.sum(1) - 1
        return pixels["pixel_values"][torch.arange(len(last)), last]

    def build_tiny(self, tiny: Any, family: str):
        from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                                  Idefics3Processor, Idefics3VisionConfig)

        tokenizer = tiny_tokenizer(tiny, extra_special_tokens=TOKENS)  # "<image>" expands to the crops' grid
        vision = Idefics3VisionConfig(**vision_dims(tiny))
        processor_tokens = (tiny.image_size // tiny.patch_size) ** 2 // SCALE**2
        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": 2 * tiny.image_size}, max_image_size={"longest_edge": tiny.image_size},
            do_image_splitting=True)
        processor = Idefics3Processor(image_processor, tokenizer, image_seq_len=processor_tokens,
                                      chat_template=tokenizer.chat_template)
        config = Idefics3Config(vision_config=vision, text_config=tiny_text_config(tiny, family, tokenizer),
                                scale_factor=SCALE, image_token_id=processor.image_token_id)
        return Idefics3ForConditionalGeneration(config), processor
