"""``defend convert lavida_dream <LaViDa-Dream folder> <output folder>``: LaViDa-Dream (github
jacklishufan/LaViDa, ``model_type: llava_dream``) as a transformers folder of the ``lavida``
architecture (``defend/models/archs/lavida.py``): LLaVA-OneVision with each crop pooled 2x2 after
the projector, over Dream-7B's text model as a ``Qwen2Config(is_causal=False)`` (Dream is Qwen2.5's
layout, q/k/v biases included, run without a causal mask). Its weights are renamed exactly as
LLaDA-V's (``defend.models.convert.rename``). What is LaViDa-Dream's own goes into
``defend_diffusion.json``: mask id 151666, shifted logits (position i-1 scores token i, Dream's
``ForCausalLMLoss`` and ``logits = cat([logits[:, :1], logits[:, :-1]])``), complementary masking
without 1/t weighting, no blocked tokens (its sampler blocks none), and its eval's decoding: Dream's
sampler with top-k margin confidence over the prompt encoded alone (``DREAM_DECODING``).

The variant is read from the config's fields, not its ``model_type`` alone: LaViDa registers its
LLaDA variant under LLaDA-V's ``llava_llada``. Parity with the authors' code:
``tests/models/test_lavida_dream.py`` (fixtures in tests/fixtures/lavida_dream).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from defend.config import ConfigError
from defend.models.archs.lavida import pooled_side
from defend.models.convert import (
    SYSTEM,
    read_weights,
    refuse_other_kind,
    rename,
    save_image_processor,
    tower_and_image_token,
)

DREAM_MASK_ID = 151666  # <|mask|>: the literal of LlavaDreamForMaskedDiffusion.forward
DREAM_EOS_ID = 151643  # <|endoftext|>: eos = pad (LaViDa's collator trains on its pads; ours pads answers with
# it to gen_length and labels those, batch padding stays unlabelled: diffusion.labels=answer)
# conv_dream (LLAMA_3 style over Dream's ChatML template) with LaViDa's system message; preprocess_dream
# puts the image first in the user's message ("<image>\n" + text)
# how LaViDa's eval decodes (eval/run_dream.sh): Dream's sampler, top-k margin confidence, the prompt
# encoded alone (prefix_lm); top_k 50 is the model config's legacy default that Dream's generation
# config takes up (the published generation_config.json sets none)
DREAM_DECODING = {"diffusion.sampler": "dream", "diffusion.dream_alg": "topk_margin", "diffusion.top_k": 50,
                  "diffusion.prefix_lm": True}
CHAT_TEMPLATE = (
    "<|im_start|>system\n" + SYSTEM + "<|im_end|>\n"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
def anyres_aspect(config: dict[str, Any], cells: int) -> str:
    """LaViDa's ``anyres`` (unpad, never shrink) as LLaVA-OneVision's ``anyres_max_N``, N the largest grid's
    crop count: the shrink ratio sqrt(h*w / (N * side^2)) then never exceeds 1."""
    aspect = config.get("image_aspect_ratio", "anyres")
    if aspect.startswith("anyres_max"):
        return aspect
    if aspect != "anyres":
        raise ConfigError(f"image_aspect_ratio '{aspect}': only LaViDa's anyres layouts convert.")
    return f"anyres_max_{cells}"


def lavida_config(source: dict[str, Any], vision: dict[str, Any], image_token_id: int) -> Any:
    from transformers import Qwen2Config, SiglipVisionConfig

    from defend.models.archs.lavida import LavidaConfig

    if source.get("mm_patch_merge_type", "spatial_unpad") != "spatial_unpad":
        raise ConfigError(f"mm_patch_merge_type '{source.get('mm_patch_merge_type')}': only spatial_unpad converts.")
    text = Qwen2Config(
        vocab_size=source["vocab_size"], hidden_size=source["hidden_size"], intermediate_size=source["intermediate_size"],
        num_hidden_layers=source["num_hidden_layers"], num_attention_heads=source["num_attention_heads"],
        num_key_value_heads=source.get("num_key_value_heads", source["num_attention_heads"]),
        hidden_act=source.get("hidden_act", "silu"), max_position_embeddings=source.get("max_position_embeddings", 32768),
        rms_norm_eps=source.get("rms_norm_eps", 1e-6), tie_word_embeddings=source.get("tie_word_embeddings", False),
        rope_parameters={"rope_type": "default", "rope_theta": source.get("rope_theta", 10000.0)},
        use_sliding_window=False, eos_token_id=source.get("eos_token_id", DREAM_EOS_ID),
        bos_token_id=source.get("bos_token_id"), pad_token_id=source.get("pad_token_id", DREAM_EOS_ID), is_causal=False)
    if source.get("rope_scaling"):
        raise ConfigError(f"rope_scaling {source['rope_scaling']}: Dream uses none; not converted.")
    tower = SiglipVisionConfig(**{**vision, "num_hidden_layers": vision["num_hidden_layers"] - 1}, vision_use_head=False)
    pinpoints = [[h, w] for w, h in source["image_grid_pinpoints"]]  # LLaVA's code writes [width, height]
    side = vision["image_size"]
    cells = max((h // side) * (w // side) for h, w in pinpoints)
    mode = source.get("mm_spatial_pool_mode", "bilinear")
    if mode not in ("bilinear", "average", "max"):
        raise ConfigError(f"mm_spatial_pool_mode '{source.get('mm_spatial_pool_mode')}': LaViDa pools bilinear, average or max.")
    return LavidaConfig(
        text_config=text, vision_config=tower, image_token_id=image_token_id, image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1,  # the last kept layer, no post_layernorm
        vision_aspect_ratio=anyres_aspect(source, cells), projector_hidden_act="gelu",
        multimodal_projector_bias=True, tie_word_embeddings=text.tie_word_embeddings, crop_pool_mode=mode)


def convert_lavida_dream(source: str | Path, target: str | Path, vision_config: str | Path | None = None,
                         image_token_id: int | None = None) -> Path:
    """Write ``target``: LaViDa-Dream's ``source`` folder as a ``lavida`` folder (plus its tokenizer, with an
    ``<image>`` token, where the source has one). ``vision_config``: a SigLIP config.json for towers other
    than so400m-384 (the one LaViDa's scripts use)."""
    from safetensors.torch import save_file

    from defend.atomic import atomic_dir, write_json

    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text())
    refuse_other_kind(source, config, "lavida_dream")
    vision, tokenizer, image_token_id = tower_and_image_token(source, config, vision_config, image_token_id)
    mask_id = config.get("mask_token_id", DREAM_MASK_ID)
    if mask_id != DREAM_MASK_ID:
        raise ConfigError(f"mask_token_id {mask_id}: LaViDa-Dream's forward masks with the literal {DREAM_MASK_ID}.")
    hf_config = lavida_config(config, vision, image_token_id)
    weights = {new: tensor.contiguous() for key, tensor in read_weights(source).items() if (new := rename(key))}
    with atomic_dir(target) as tmp:
        hf_config.save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.chat_template = CHAT_TEMPLATE
            if tokenizer.mask_token is None:
                tokenizer.mask_token = tokenizer.convert_ids_to_tokens(DREAM_MASK_ID)
            tokenizer.save_pretrained(tmp)
        save_image_processor(tmp, hf_config)  # LLaDA-V's (the same SigLIP preprocessing), then the pooled count
        settings_file = tmp / "processor_config.json"
        settings = json.loads(settings_file.read_text())
        settings["num_image_tokens"] = pooled_side(hf_config) ** 2  # 196 for so400m-384
        write_json(settings_file, settings)
        write_json(tmp / "defend_diffusion.json", {
            "model.family": "mdlm", "diffusion.mask_token_id": DREAM_MASK_ID, "diffusion.blocked_token_ids": [],
            "diffusion.inverse_t_weight": False, "diffusion.complementary_mask": True,
            "diffusion.shifted_logits": True, **DREAM_DECODING,
            "source": str(source), "source_model_type": config.get("model_type")})
        for extra in ("generation_config.json", "preprocessor_config.json"):
            if (source / extra).is_file() and not (tmp / extra).is_file():
                shutil.copy(source / extra, tmp / extra)
    return target
