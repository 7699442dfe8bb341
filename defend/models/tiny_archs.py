"""Tiny random-init BLIP-2, Qwen2-VL and PaliGemma folders (the LLaVA layout lives in ``tiny.py``).

Each is built from transformers' own classes, so the generic loader, collator and LoRA code meet
the prompt formats and extra inputs of these families (query tokens, M-RoPE grids, prefix-LM
token types) without a real checkpoint. Sizes come from ``TinyConfig``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessorPil,
    GemmaConfig,
    OPTConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)
from transformers.utils import is_torchvision_available

from defend.config import ConfigError, TinyConfig
from defend.models.image_only_processor import Qwen2VLImageOnlyProcessor
from defend.models.tiny import save_tiny, special_token_ids, text_dims, tiny_tokenizer, vision_dims
from defend.models.tokenizer import IMAGE_TOKEN

BLIP2_QUERY_TOKENS = 8
QWEN2_VL_MERGE = 2  # spatial merge: each 2x2 block of patches becomes one image token
QWEN2_VL_TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
# Qwen2-VL's ChatML turn, with the vision block the processor expands, and the tiny answer cue.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ModelAndProcessor = tuple[PreTrainedModel, Any]


def _blip2(tiny: TinyConfig) -> ModelAndProcessor:
    """BLIP-2 with an OPT decoder; the processor prepends the query-token placeholders itself."""
    # No named image_token: Blip2Processor (5.x) calls `.content` on it, which a str lacks; unnamed,
    # the processor registers "<image>" (already atomic) as an AddedToken itself.
    tokenizer = tiny_tokenizer(tiny, extra_special_tokens={}, chat_template=None)  # plain-text prompts
    vision = Blip2VisionConfig(**vision_dims(tiny))
    qformer = Blip2QFormerConfig(
        hidden_size=tiny.vision_hidden,
        intermediate_size=4 * tiny.vision_hidden,
        num_hidden_layers=1,
        num_attention_heads=tiny.heads,
        cross_attention_frequency=1,
        encoder_hidden_size=tiny.vision_hidden,
    )
    text = OPTConfig(
        hidden_size=tiny.text_hidden,
        word_embed_proj_dim=tiny.text_hidden,
        ffn_dim=4 * tiny.text_hidden,
        num_hidden_layers=tiny.text_layers,
        num_attention_heads=tiny.heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        **special_token_ids(tokenizer),
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=BLIP2_QUERY_TOKENS,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    image_processor = BlipImageProcessorPil(size={"height": tiny.image_size, "width": tiny.image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=BLIP2_QUERY_TOKENS)
    return Blip2ForConditionalGeneration(config), processor


def _qwen2_vl(tiny: TinyConfig) -> ModelAndProcessor:
    """Qwen2-VL: dynamic-resolution patches, M-RoPE, ChatML prompt with a vision block."""
    tokenizer = tiny_tokenizer(tiny, extra_special_tokens=QWEN2_VL_TOKENS,
                               chat_template=QWEN2_VL_CHAT_TEMPLATE)
    half_head = tiny.text_hidden // tiny.heads // 2
    spatial = half_head * 3 // 8  # Qwen2-VL's 16/24/24 split of the rotary half, scaled down
    vision = dict(
        depth=tiny.vision_layers,
        embed_dim=tiny.vision_hidden,
        hidden_size=tiny.text_hidden,  # the merger projects into the text model's width
        num_heads=tiny.heads,
        patch_size=tiny.patch_size,
        spatial_merge_size=QWEN2_VL_MERGE,
        temporal_patch_size=2,
    )
    text = dict(
        **text_dims(tiny),
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": [half_head - 2 * spatial, spatial, spatial]},
        **special_token_ids(tokenizer),
    )
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in QWEN2_VL_TOKENS.items()}
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"],
        vision_end_token_id=ids["vision_end_token"],
    )
    pixels = tiny.image_size**2  # min = max: every image is resized to image_size x image_size
    sizes = dict(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=tiny.patch_size,
                 temporal_patch_size=2, merge_size=QWEN2_VL_MERGE)
    image_processor = Qwen2VLImageProcessorPil(**sizes)
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        processor = Qwen2VLProcessor(image_processor, tokenizer, Qwen2VLVideoProcessor(**sizes),
                                     chat_template=QWEN2_VL_CHAT_TEMPLATE)
    else:
        processor = Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    return Qwen2VLForConditionalGeneration(config), processor


def _paligemma(tiny: TinyConfig) -> ModelAndProcessor:
    """PaliGemma: SigLIP + Gemma, prefix-LM attention over image + prompt (token_type_ids 0)."""
    tokenizer = tiny_tokenizer(tiny, chat_template=None)  # "<image>...<bos>prompt\n" comes from the processor
    image_processor = SiglipImageProcessorPil(size={"height": tiny.image_size, "width": tiny.image_size})
    image_processor.image_seq_length = (tiny.image_size // tiny.patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor, tokenizer)  # adds <loc....>/<seg...> tokens
    vision = SiglipVisionConfig(
        **vision_dims(tiny),
        vision_use_head=False,
    )
    text = GemmaConfig(
        **text_dims(tiny),
        head_dim=tiny.text_hidden // tiny.heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=1024,
        **special_token_ids(tokenizer),
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=tiny.text_hidden,
        hidden_size=tiny.text_hidden,
    )
    return PaliGemmaForConditionalGeneration(config), processor


BUILDERS: dict[str, Callable[[TinyConfig], ModelAndProcessor]] = {
    "blip2": _blip2,
    "qwen2_vl": _qwen2_vl,
    "paligemma": _paligemma,
}


def build_tiny_arch(tiny: TinyConfig, family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the random-init ``tiny.arch`` model (autoregressive family only) to ``out_dir``."""
    if tiny.arch not in BUILDERS:
        choices = ", ".join(["llava", *BUILDERS])
        raise ConfigError(f"tiny.arch: no tiny builder for '{tiny.arch}'; choose one of {choices}.")
    if family != "mllm":
        raise ConfigError(
            f"tiny.arch={tiny.arch} with model.family={family}: the masked-diffusion family uses the"
            " LLaVA layout; set tiny.arch=llava (or model.family=mllm)."
        )
    torch.manual_seed(seed)
    model, processor = BUILDERS[tiny.arch](tiny)
    return save_tiny(model, processor, tiny, family, out_dir)
