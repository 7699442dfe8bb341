"""LLaVA-OneVision (``llava_onevision``): SigLIP, anyres up to a 6x6 grid (``anyres_max_9``),
bilinear pooling of large grids, newline tokens; the layout LLaDA-V builds on."""
from __future__ import annotations

from typing import Any

from defend.models.archs.base import AnyResArchitecture
from defend.models.archs.llava import tiny_llava_config
from defend.models.archs.llava_next import tiny_pinpoints
from defend.models.image_only_processor import LlavaOnevisionImageOnlyProcessor
from defend.models.tiny_components import tiny_tokenizer, vision_dims


class LlavaOneVision(AnyResArchitecture):
    model_type = "llava_onevision"
    tiny_arch = "llava_onevision"
    diffusion = True

    def build_tiny(self, tiny: Any, family: str):
        from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                                  LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor, Qwen2Config,
                                  SiglipVisionConfig)
        from transformers.utils import is_torchvision_available

        tokenizer = tiny_tokenizer(tiny)
        pinpoints = tiny_pinpoints(tiny.image_size)
        config = tiny_llava_config(LlavaOnevisionConfig, tiny, family, tokenizer,
                                   SiglipVisionConfig(**vision_dims(tiny), vision_use_head=False), Qwen2Config,
                                   image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9")
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": tiny.image_size, "width": tiny.image_size}, image_grid_pinpoints=pinpoints)
        processor_class = LlavaOnevisionProcessor if is_torchvision_available() else LlavaOnevisionImageOnlyProcessor
        settings = dict(num_image_tokens=(tiny.image_size // tiny.patch_size) ** 2,
                        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
        if is_torchvision_available():
            from transformers import LlavaOnevisionVideoProcessor

            settings["video_processor"] = LlavaOnevisionVideoProcessor()
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=tokenizer.chat_template, **settings)
        return LlavaOnevisionForConditionalGeneration(config), processor
