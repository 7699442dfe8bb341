"""BLIP-2 (``blip-2``): a ViT, a Q-Former whose learned queries read it, and a projection of the
queries into the language model: the vision tokens are the projected queries (``num_query_tokens``
per image), which the processor places before the prompt."""
from __future__ import annotations

from typing import Any

import torch

from defend.models.archs.base import Architecture
from defend.models.tiny_components import special_token_ids, tiny_tokenizer, vision_dims
from defend.models.tokenizer import IMAGE_TOKEN

QUERY_TOKENS = 8


class Blip2(Architecture):
    model_type = "blip-2"
    tiny_arch = "blip2"
    vision_tower = "vision_model"
    vision_extra = ("qformer",)
    projector = ("language_projection",)

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.language_model  # an OPTForCausalLM / T5: it gets inputs_embeds in forward and generate

    def keeps_pixels(self) -> bool:
        return True  # Blip2ForConditionalGeneration.forward/generate always run the vision tower

    def build_tiny(self, tiny: Any, family: str):
        from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                                  Blip2VisionConfig, BlipImageProcessorPil, OPTConfig)

        # No named image_token: Blip2Processor (5.x) calls `.content` on it, which a str lacks; unnamed,
        # the processor registers "<image>" (already atomic) as an AddedToken itself.
        tokenizer = tiny_tokenizer(tiny, extra_special_tokens={}, chat_template=None)  # plain-text prompts
        qformer = Blip2QFormerConfig(
            hidden_size=tiny.vision_hidden, intermediate_size=4 * tiny.vision_hidden, num_hidden_layers=1,
            num_attention_heads=tiny.heads, cross_attention_frequency=1, encoder_hidden_size=tiny.vision_hidden)
        text = OPTConfig(
            hidden_size=tiny.text_hidden, word_embed_proj_dim=tiny.text_hidden, ffn_dim=4 * tiny.text_hidden,
            num_hidden_layers=tiny.text_layers, num_attention_heads=tiny.heads, vocab_size=len(tokenizer),
            max_position_embeddings=1024, **special_token_ids(tokenizer))
        config = Blip2Config(
            vision_config=Blip2VisionConfig(**vision_dims(tiny)), qformer_config=qformer, text_config=text,
            num_query_tokens=QUERY_TOKENS, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        image_processor = BlipImageProcessorPil(size={"height": tiny.image_size, "width": tiny.image_size})
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=QUERY_TOKENS)
        return Blip2ForConditionalGeneration(config), processor
