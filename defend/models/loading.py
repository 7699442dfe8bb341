"""Load a model folder (real checkpoint or tiny) with its processor, optionally in 4 bits."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from defend.config import Config, ConfigError
from defend.models.archs import ARCHITECTURES, check_model_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(cfg: Config) -> Path:
    from defend.models.tiny import TINY_PATH, tiny_model_path

    if cfg.model.path == TINY_PATH:
        return tiny_model_path(cfg.tiny, cfg.model.family)
    path = Path(cfg.model.path)
    if not cfg.model.path or not path.is_dir():
        raise ConfigError(
            f"model.path: '{cfg.model.path}' is not a folder. Point it at a local checkpoint"
            " saved with save_pretrained (config.json + weights), or use model.path=tiny."
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: '{path}' has no config.json; is it a Hugging Face model folder?")
    return path


def check_model_files(cfg: Config) -> tuple[Path, str]:
    """What can be checked without loading any weights: the folder, its architecture (``model_type``
    with an adapter, masked diffusion allowed on it) and the adapter folder; returns the folder and type."""
    path = resolve_model_path(cfg)
    model_type = check_model_folder(path, cfg.model.family)
    if cfg.model.adapter and not (Path(cfg.model.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"model.adapter: '{cfg.model.adapter}' has no adapter_config.json (a peft LoRA folder).")
    return path, model_type


def full_precision_modules(model_type: str) -> list[str]:
    """Skip patterns of the modules QLoRA keeps in full precision: the vision side and the output head.
    Regexes: transformers matches skip patterns from the start of the full module name."""
    return [rf".*\b{name}" for name in (*ARCHITECTURES[model_type]().vision_modules(), "lm_head")]


def quantization_config(cfg: Config, model_type: str) -> Any:
    from transformers import BitsAndBytesConfig

    if cfg.quant.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=full_precision_modules(model_type))
    if not cfg.quant.load_in_4bit:
        return None

    compute = DTYPES[cfg.model.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute,  # = compute dtype, so ZeRO-3 can shard it (peft docs)
        llm_int8_skip_modules=full_precision_modules(model_type),
    )


def load_pretrained(cfg: Config, train_adapter: bool = False) -> tuple[torch.nn.Module, Any]:
    """The Hugging Face model and processor that ``cfg.model`` names (adapter applied if set; its weights
    trainable with ``train_adapter``: a fine-tune that continues it)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from defend.models.image_only_processor import image_only_processor

    path, model_type = check_model_files(cfg)  # before any weights load
    remote = cfg.model.trust_remote_code
    processor = image_only_processor(path, model_type, remote) or AutoProcessor.from_pretrained(
        path, trust_remote_code=remote)
    model = AutoModelForImageTextToText.from_pretrained(
        path,
        dtype=DTYPES[cfg.model.dtype],
        quantization_config=quantization_config(cfg, model_type),
        device_map=cfg.model.device_map,
        trust_remote_code=remote,
    )
    if cfg.model.vision_tower_from:
        from transformers.integrations import is_deepspeed_zero3_enabled

        from defend.models.vision import load_vision_tower

        if is_deepspeed_zero3_enabled():
            raise ConfigError(
                "model.vision_tower_from under ZeRO-3: the encoder cannot be copied into a sharded model."
                " Run this stage with deepspeed=zero2 (its saved model then holds the encoder).")

        load_vision_tower(model, cfg.model.vision_tower_from, remote)
    if cfg.model.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, Path(cfg.model.adapter), is_trainable=train_adapter)
    return model, processor
