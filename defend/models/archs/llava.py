"""LLaVA-1.5 (``llava``): a CLIP/SigLIP tower, a 2-layer MLP projector, one fixed grid of tokens per image."""
from __future__ import annotations

from typing import Any

from defend.models.archs.base import Architecture
from defend.models.tiny_components import special_token_ids, text_dims, tiny_tokenizer, vision_dims
from defend.models.tokenizer import IMAGE_TOKEN


def tiny_text_config(tiny: Any, family: str, tokenizer: Any, config_class: Any = None) -> Any:
    """A Llama-style decoder of the tiny sizes; bidirectional for masked diffusion (``is_causal`` must be
    set at construction to reach the attention modules, REFERENCE.md section 3)."""
    from transformers import LlamaConfig

    return (config_class or LlamaConfig)(
        **text_dims(tiny), vocab_size=len(tokenizer), max_position_embeddings=1024,
        tie_word_embeddings=tiny.tie_embeddings, is_causal=(family == "mllm"), **special_token_ids(tokenizer))


def tiny_llava_config(config_class: Any, tiny: Any, family: str, tokenizer: Any, vision: Any,
                      text_class: Any = None, **layout: Any) -> Any:
    """A LLaVA-family config (``config_class``) of the tiny sizes: ``vision`` tower, tiny text model,
    the features of vision layer ``tiny.vision_feature_layer``, the architecture's own ``layout`` settings."""
    return config_class(vision_config=vision, text_config=tiny_text_config(tiny, family, tokenizer, text_class),
                        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                        vision_feature_layer=tiny.vision_feature_layer,
                        **layout)


class Llava(Architecture):
    model_type = "llava"
    tiny_arch = "llava"
    diffusion = True

    def build_tiny(self, tiny: Any, family: str):
        from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig,
                                  LlavaForConditionalGeneration, LlavaProcessor)

        tokenizer = tiny_tokenizer(tiny)
        config = tiny_llava_config(LlavaConfig, tiny, family, tokenizer, CLIPVisionConfig(**vision_dims(tiny)),
                                   vision_feature_select_strategy="default", projector_hidden_act="gelu")
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": tiny.image_size},
            crop_size={"height": tiny.image_size, "width": tiny.image_size},
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=tiny.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            chat_template=tokenizer.chat_template,
        )
        return LlavaForConditionalGeneration(config), processor
