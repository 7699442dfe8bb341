"""PaliGemma (``paligemma``): SigLIP + a linear projector + Gemma, prefix-LM attention over the image
and prompt (``token_type_ids`` 0). The vision tokens at the seam are the projector's output divided
by sqrt(hidden): Gemma multiplies every input embedding by sqrt(hidden), text and image alike."""
from __future__ import annotations

from typing import Any

from defend.models.archs.base import Architecture
from defend.models.tiny_components import special_token_ids, text_dims, tiny_tokenizer, vision_dims


class PaliGemma(Architecture):
    model_type = "paligemma"
    tiny_arch = "paligemma"

    def build_tiny(self, tiny: Any, family: str):
        from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                                  PaliGemmaProcessor, SiglipImageProcessorPil, SiglipVisionConfig)

        tokenizer = tiny_tokenizer(tiny, chat_template=None)  # "<image>...<bos>prompt\n" comes from the processor
        image_processor = SiglipImageProcessorPil(size={"height": tiny.image_size, "width": tiny.image_size})
        image_processor.image_seq_length = (tiny.image_size // tiny.patch_size) ** 2
        processor = PaliGemmaProcessor(image_processor, tokenizer)  # adds <loc....>/<seg...> tokens
        text = GemmaConfig(**text_dims(tiny), head_dim=tiny.text_hidden // tiny.heads, vocab_size=len(tokenizer),
                           max_position_embeddings=1024, **special_token_ids(tokenizer))
        config = PaliGemmaConfig(
            vision_config=SiglipVisionConfig(**vision_dims(tiny), vision_use_head=False), text_config=text,
            image_token_index=tokenizer.image_token_id, vocab_size=len(tokenizer),
            projection_dim=tiny.text_hidden, hidden_size=tiny.text_hidden)
        return PaliGemmaForConditionalGeneration(config), processor
