"""Wrap a model in a DeepSpeed engine: optimizer over trainable params, warmup + cosine lr."""
from __future__ import annotations

import math

import torch

from defend.config import Config
from defend.engine.distributed import init_distributed, world_size
from defend.engine.ds_config import load_ds_config, resolve_auto_values


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_engine(model: torch.nn.Module, cfg: Config, total_steps: int):
    """A DeepSpeed engine for ``model`` at any world size (1 included)."""
    import deepspeed

    init_distributed()
    ds_config = resolve_auto_values(load_ds_config(cfg.deepspeed), cfg, world_size())
    params = [p for p in model.parameters() if p.requires_grad]
    factor = warmup_cosine(total_steps, cfg.train.warmup_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )
    return engine
