"""Gemma 3 (``gemma3``): SigLIP, patch features average-pooled to ``mm_tokens_per_image`` tokens, a
linear projector, Gemma 3's text model; image tokens between ``<start_of_image>`` and ``<end_of_image>``
attend to each other both ways (``token_type_ids``)."""
from __future__ import annotations

from typing import Any

from defend.models.archs.base import Architecture
from defend.models.tiny_components import special_token_ids, text_dims, tiny_tokenizer, vision_dims
from defend.models.tokenizer import tiny_chat_template

TOKENS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
CHAT_TEMPLATE = tiny_chat_template("<start_of_image>")  # the processor expands the image's start marker
POOLED_SIDE = 2  # the tiny model pools its patch grid to 2 x 2 tokens (the published: 16 x 16 = 256)


class Gemma3(Architecture):
    model_type = "gemma3"
    tiny_arch = "gemma3"

    def build_tiny(self, tiny: Any, family: str):
        from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                                  Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig)

        tokenizer = tiny_tokenizer(tiny, extra_special_tokens=TOKENS, chat_template=CHAT_TEMPLATE)
        text = Gemma3TextConfig(**text_dims(tiny), head_dim=tiny.text_hidden // tiny.heads, vocab_size=len(tokenizer),
                                max_position_embeddings=1024, sliding_window=64, **special_token_ids(tokenizer))
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in TOKENS.items()}
        config = Gemma3Config(
            text_config=text, vision_config=SiglipVisionConfig(**vision_dims(tiny), vision_use_head=False),
            mm_tokens_per_image=POOLED_SIDE**2, image_token_index=ids["image_token"],
            boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"])
        image_processor = Gemma3ImageProcessorPil(size={"height": tiny.image_size, "width": tiny.image_size})
        processor = Gemma3Processor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE,
                                    image_seq_length=POOLED_SIDE**2)
        model = Gemma3ForConditionalGeneration(config)
        # transformers initialises the projection to zeros (every image would reach the text model as 0)
        model.model.multi_modal_projector.mm_input_projection_weight.data.normal_(0.0, config.initializer_range)
        return model, processor
