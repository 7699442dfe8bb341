"""DeepSpeed JSON configs: find them by name, resolve every "auto" from the recipe config, refuse
combinations that cannot work before anything is loaded."""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from defend.config import Config, ConfigError
from defend.shipped import DS_CONFIG_DIR, require


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """``zero2`` (a file in ds_configs/) or a path to a user's JSON."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = require(DS_CONFIG_DIR, f"deepspeed={name_or_path}") / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"shipped: {', '.join(names)}."
        raise ConfigError(f"deepspeed: no DeepSpeed config '{name_or_path}' ({path}); {hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {err}") from err


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def resolve_auto_values(ds: dict[str, Any], cfg: Config, world_size: int,
                        hidden_size: int | None = None) -> dict[str, Any]:
    """A copy of ``ds`` with every "auto" filled from ``cfg``; an unknown "auto" is an error.

    ``hidden_size`` (the text model's) sizes the ZeRO-3 buckets as the Hugging Face integration does:
    reduce bucket h^2, prefetch bucket 0.9 h^2, parameters under 10 h stay unpartitioned.
    """
    t = cfg.train
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer.params.lr": t.lr,
        "optimizer.params.weight_decay": t.weight_decay,
        "bf16.enabled": cfg.model.dtype == "bfloat16",
        "fp16.enabled": cfg.model.dtype == "float16",
    }
    if hidden_size:
        values.update({
            "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        })

    def fill(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: fill(v, f"{prefix}{k}.") for k, v in node.items()}
        key = prefix.rstrip(".")
        if node == "auto":
            if key not in values:
                raise ConfigError(f"deepspeed: cannot resolve \"auto\" for '{key}'; give it a value in the JSON.")
            return values[key]
        return node

    return fill(ds, "")


def check_combination(cfg: Config, ds: dict[str, Any]) -> None:
    """Refuse, at config time, what DeepSpeed, peft or bitsandbytes cannot do together."""
    stage = zero_stage(ds)
    q = cfg.quant
    if q.load_in_4bit and q.load_in_8bit:
        raise ConfigError("quant: load_in_4bit and load_in_8bit are both set; keep one.")
    if (q.load_in_4bit or q.load_in_8bit) and not cfg.lora.enabled:
        raise ConfigError("quant: a quantized base cannot be trained in full; set lora.enabled=true (QLoRA).")
    if stage == 3 and q.load_in_8bit:
        raise ConfigError(
            f"quant.load_in_8bit with ZeRO-3 ({cfg.deepspeed}): ZeRO-3 cannot shard int8 weights. Use "
            "quant.load_in_4bit=true (QLoRA, stored in the compute dtype so it shards) or deepspeed=zero2."
        )
    if stage == 3 and cfg.model.device_map:
        raise ConfigError(
            f"model.device_map={cfg.model.device_map!r} with ZeRO-3 ({cfg.deepspeed}): ZeRO-3 places the "
            "shards itself; remove model.device_map (or use deepspeed=zero2)."
        )
    if cfg.model.device_map and cfg.launcher != "none":
        raise ConfigError(
            f"model.device_map={cfg.model.device_map!r} with launcher={cfg.launcher}: each rank holds the "
            "model on its own device; remove model.device_map for distributed training."
        )
    offload = ds.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
    if offload not in (None, "none") and stage != 3:
        raise ConfigError(f"deepspeed: offload_param needs ZeRO stage 3, {cfg.deepspeed} has stage {stage}.")
