"""LLaVA-NeXT (``llava_next``, LLaVA-1.6): anyres, a base view plus the crops of the best grid pinpoint,
unpadded, with an ``image_newline`` token after every row of crop tokens."""
from __future__ import annotations

from typing import Any

from defend.models.archs.base import AnyResArchitecture
from defend.models.archs.llava import tiny_llava_config
from defend.models.tiny_components import tiny_tokenizer, vision_dims


def tiny_pinpoints(size: int) -> list[list[int]]:
    """Grids of 1x1 to 2x2 crops, as the published 336 px grids are, at the tiny crop size."""
    return [[size * r, size * c] for r in (1, 2) for c in (1, 2)]


class LlavaNext(AnyResArchitecture):
    model_type = "llava_next"
    tiny_arch = "llava_next"
    diffusion = True

    def build_tiny(self, tiny: Any, family: str):
        from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                                  LlavaNextImageProcessorPil, LlavaNextProcessor)

        tokenizer = tiny_tokenizer(tiny)
        pinpoints = tiny_pinpoints(tiny.image_size)
        config = tiny_llava_config(LlavaNextConfig, tiny, family, tokenizer, CLIPVisionConfig(**vision_dims(tiny)),
                                   image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default")
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": tiny.image_size},
            crop_size={"height": tiny.image_size, "width": tiny.image_size},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=tiny.patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=tokenizer.chat_template,
        )
        return LlavaNextForConditionalGeneration(config), processor
