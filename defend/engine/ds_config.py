"""DeepSpeed JSON configs: find them by name, resolve every "auto" from the recipe config."""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from defend.config import Config, ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """``zero2`` (a file in ds_configs/) or a path to a user's JSON."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"shipped: {', '.join(names)}."
        raise ConfigError(f"deepspeed: no DeepSpeed config '{name_or_path}' ({path}); {hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"deepspeed: {path} is not valid JSON: {err}") from err


def resolve_auto_values(ds: dict[str, Any], cfg: Config, world_size: int) -> dict[str, Any]:
    """A copy of ``ds`` with every "auto" filled from ``cfg``; an unknown "auto" is an error."""
    t = cfg.train
    values = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer.params.lr": t.lr,
        "optimizer.params.weight_decay": t.weight_decay,
        "bf16.enabled": cfg.model.dtype == "bfloat16",
        "fp16.enabled": cfg.model.dtype == "float16",
    }

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
