"""One-time conversion of published checkpoints that need their authors' package into standard
transformers folders: ``defend convert llada_v <LLaDA-V folder> <output folder>``.

Why convert rather than load in place: LLaDA-V (``model_type: llava_llada``) is exactly the
LLaVA-OneVision layout (SigLIP, a 2-layer GELU projector, anyres with unpadding, ``anyres_max_4``
shrinking and newline tokens) over a Llama-style decoder run without a causal mask. transformers
ships every one of those pieces, so the converted folder is a ``LlavaOnevisionForConditionalGeneration``
whose text config is a ``LlamaConfig`` with ``is_causal: false``, and everything else in defend
(the architecture adapter, the vision-token seam, ZeRO-3's sharded ``from_pretrained``, peft,
QLoRA) works on it unchanged, with no modeling code of ours to keep in step with the paper's.
What is LLaDA-V's own (the mask id, the tokens its sampler never writes, its SFT label rule) goes
into ``defend_diffusion.json`` beside the weights: the settings every run on the folder starts from
(``defend.config.with_model_settings``; the config file and the command line override them); its
prompt format is the converted tokenizer's chat template.
Parity with the authors' code: ``tests/models/test_llada_v.py`` (fixtures in tests/fixtures/llada_v).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from defend.config import ConfigError

LLADA_MASK_ID = 126336
# generate_with_embeds sets these to -inf at masked positions: eos/pad, bos, <|start_header_id|>, <|end_header_id|>
LLADA_V_BLOCKED_IDS = [126081, 126080, 126346, 126347]
# the vision tower LLaDA-V's code hard-codes (SigLIP so400m-patch14-384), before it drops the last layer
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              patch_size=14, image_size=384, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# conv_llava_llada (LLaMA-3 style): every message "<|startoftext|><|start_header_id|>{role}<|end_header_id|>\n\n
# {content}<|eot_id|>", later messages without the leading <|startoftext|>; its default system message
SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that the"
          " user provides, and assist the user with a variety of tasks using natural language.")
CHAT_TEMPLATE = (
    "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + SYSTEM + "<|eot_id|>"
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def rename(key: str) -> str | None:
    """A LLaDA-V weight name -> its LLaVA-OneVision name (None: not kept)."""
    tower = "model.vision_tower.vision_tower.vision_model."
    if key.startswith(tower):
        return "model.vision_tower.vision_model." + key[len(tower):]
    if key.startswith("model.mm_projector."):
        index, rest = key[len("model.mm_projector."):].split(".", 1)
        return f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"
    if key == "model.image_newline" or key == "lm_head.weight":
        return key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no *.safetensors weights (LLaDA-V ships model-0000N-of-0000M.safetensors).")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(file))
    return weights


def onevision_config(source: dict[str, Any], vision: dict[str, Any], image_token_id: int) -> Any:
    from transformers import LlamaConfig, LlavaOnevisionConfig, SiglipVisionConfig

    text = LlamaConfig(
        vocab_size=source["vocab_size"], hidden_size=source["hidden_size"],
        intermediate_size=source["intermediate_size"], num_hidden_layers=source["num_hidden_layers"],
        num_attention_heads=source["num_attention_heads"],
        num_key_value_heads=source.get("num_key_value_heads", source["num_attention_heads"]),
        hidden_act=source.get("hidden_act", "silu"), max_position_embeddings=source.get("max_position_embeddings", 8192),
        rms_norm_eps=source.get("rms_norm_eps", 1e-5), attention_bias=source.get("attention_bias", False),
        rope_parameters={"rope_type": "default", "rope_theta": source.get("rope_theta", 500000.0)},
        tie_word_embeddings=source.get("tie_word_embeddings", False), eos_token_id=source.get("eos_token_id"),
        pad_token_id=source.get("eos_token_id"), is_causal=False)  # LLaDA pads with eos; no causal mask
    tower = SiglipVisionConfig(**{**vision, "num_hidden_layers": vision["num_hidden_layers"] - 1},  # LLaDA-V drops the last
                               vision_use_head=False)
    aspect = source.get("image_aspect_ratio", "anyres_max_4")
    if not aspect.startswith("anyres"):
        raise ConfigError(f"image_aspect_ratio '{aspect}': only the anyres layouts LLaDA-V ships convert.")
    return LlavaOnevisionConfig(
        text_config=text, vision_config=tower, image_token_id=image_token_id,
        image_grid_pinpoints=[[h, w] for w, h in source["image_grid_pinpoints"]],  # LLaDA-V writes [width, height]
        vision_feature_select_strategy="full", vision_feature_layer=-1,  # the last kept layer, no post_layernorm
        vision_aspect_ratio=aspect if "max" in aspect else "anyres_max_9", projector_hidden_act="gelu",
        multimodal_projector_bias=True, tie_word_embeddings=text.tie_word_embeddings)


KINDS = {"llada_v": "LLaDA-V (ML-GSAI/LLaDA-V)", "lavida_dream": "LaViDa-Dream (jacklishufan/LaViDa)",
         "lavida_llada": "LaViDa-LLaDA (jacklishufan/LaViDa)"}


def source_kind(config: dict[str, Any]) -> str | None:
    """Which published multimodal masked-diffusion format a config.json is, by its fields: LaViDa-LLaDA
    keeps LLaDA's OLMo-style config (``d_model``, ``n_layers``) under ``llava_llada``, LLaDA-V a
    Llama-style one (``hidden_size``); LaViDa-Dream is a Dream config (``mask_token_id``) under
    ``llava_dream``. None: not one of them."""
    if "mm_hidden_size" not in config and "mm_vision_tower" not in config:
        return None
    dream = config.get("model_type") == "llava_dream" or any("Dream" in a for a in config.get("architectures") or [])
    if dream or (config.get("mask_token_id") is not None and "d_model" not in config):
        return "lavida_dream"
    if config.get("model_type") == "llava_llada":
        return "lavida_llada" if "d_model" in config else "llada_v"
    return None


def refuse_other_kind(source: Path, config: dict[str, Any], wanted: str) -> None:
    kind = source_kind(config)
    if kind == wanted:
        return
    what = f"a {KINDS[kind]} folder" if kind else f"not a {KINDS[wanted]} folder"
    hint = {None: "", "lavida_llada": " (not convertible yet)"}.get(kind, f": run `defend convert {kind}`")
    raise ConfigError(f"{source}/config.json (model_type '{config.get('model_type')}'): {what}{hint}.")


def convert_llada_v(source: str | Path, target: str | Path, vision_config: str | Path | None = None,
                    image_token_id: int | None = None) -> Path:
    """Write ``target``: LLaDA-V's ``source`` folder as a LLaVA-OneVision folder (plus its tokenizer, with
    an ``<image>`` token, where the source has one). ``vision_config``: a SigLIP config.json for towers
    other than so400m-384 (the one LLaDA-V's code assumes)."""
    from safetensors.torch import save_file

    from defend.atomic import atomic_dir, write_json

    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text())
    refuse_other_kind(source, config, "llada_v")  # by its fields: LaViDa's LLaDA variant is llava_llada too
    vision, tokenizer, image_token_id = tower_and_image_token(source, config, vision_config, image_token_id)
    hf_config = onevision_config(config, vision, image_token_id)
    weights = {}
    for key, tensor in read_weights(source).items():
        new = rename(key)
        if new is not None:
            weights[new] = tensor.contiguous()
    with atomic_dir(target) as tmp:
        hf_config.save_pretrained(tmp)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.chat_template = CHAT_TEMPLATE
            if tokenizer.mask_token is None:
                tokenizer.mask_token = tokenizer.convert_ids_to_tokens(LLADA_MASK_ID)
            tokenizer.save_pretrained(tmp)
        save_image_processor(tmp, hf_config)
        write_json(tmp / "defend_diffusion.json", {
            "model.family": "mdlm", "diffusion.mask_token_id": LLADA_MASK_ID,
            "diffusion.blocked_token_ids": LLADA_V_BLOCKED_IDS, "diffusion.inverse_t_weight": True,
            "diffusion.shifted_logits": False, "diffusion.labels": "llada_v",
            "source": str(source), "source_model_type": "llava_llada"})
        if (source / "generation_config.json").is_file():  # its image processor is not kept: ours is anyres
            shutil.copy(source / "generation_config.json", tmp / "generation_config.json")
    return target


def tower_and_image_token(source: Path, config: dict[str, Any], vision_config: str | Path | None,
                          image_token_id: int | None) -> tuple[dict[str, Any], Any | None, int]:
    """What every LLaVA-codebase converter needs first: the SigLIP tower's settings (so400m-384, or the keys
    of ``vision_config``), the source's tokenizer (None without one) and the ``<image>`` id (added to that
    tokenizer unless given), checked to fit the embedding."""
    vision = dict(SO400M)
    if vision_config:
        given = json.loads(Path(vision_config).read_text())
        vision.update({k: given[k] for k in SO400M if k in given})
    tokenizer = load_tokenizer(source)
    if image_token_id is None:
        if tokenizer is None:
            raise ConfigError(f"{source}: no tokenizer to add an <image> token to; pass image_token_id.")
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id >= config["vocab_size"]:
        raise ConfigError(f"the <image> token id {image_token_id} does not fit the {config['vocab_size']}-row embedding.")
    return vision, tokenizer, image_token_id


def save_image_processor(folder: Path, config: Any) -> None:
    """LLaDA-V's image processor and processor settings, as ``from_pretrained`` reads them."""
    from defend.atomic import write_json

    image_processor(config).save_pretrained(folder)
    write_json(folder / "processor_config.json",
               {"processor_class": "LlavaOnevisionProcessor", **processor_settings(config)})


def image_processor(config: Any) -> Any:
    """LLaVA-OneVision's image processor with LLaDA-V's preprocessing: SigLIP's 0.5 mean/std, bicubic,
    the anyres grid, the base view first."""
    from transformers import LlavaOnevisionImageProcessor

    side = config.vision_config.image_size
    return LlavaOnevisionImageProcessor(
        size={"height": side, "width": side}, image_grid_pinpoints=config.image_grid_pinpoints,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=3, do_pad=True)


def processor_settings(config: Any) -> dict[str, Any]:
    """LlavaOnevisionProcessor's arguments: 729 tokens per 384 px crop, every patch kept, anyres_max_N."""
    side = config.vision_config.image_size
    return {"image_token": "<image>", "num_image_tokens": (side // config.vision_config.patch_size) ** 2,
            "vision_feature_select_strategy": "full", "vision_aspect_ratio": config.vision_aspect_ratio}


def load_tokenizer(folder: Path) -> Any | None:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
