"""DeepSpeed around a model: the resolved config (ZeRO-3 registered with transformers before the
model is built), then the engine with its optimizer over trainable params and warmup + cosine lr."""
from __future__ import annotations

import math
from typing import Any

import torch

from defend.config import Config
from defend.engine.distributed import init_distributed, world_size
from defend.engine.ds_config import check_combination, load_ds_config, resolve_auto_values, zero_stage

# transformers builds models partitioned (zero.Init) while a HfDeepSpeedConfig with ZeRO-3 is alive
_hf_deepspeed_config: Any = None


def text_hidden_size(cfg: Config) -> int:
    """Hidden size of the text model (multimodal configs nest it under text_config)."""
    from transformers import AutoConfig

    from defend.models.loading import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(cfg), trust_remote_code=cfg.model.trust_remote_code)
    return config.get_text_config().hidden_size


def prepare_deepspeed(cfg: Config) -> dict[str, Any]:
    """Call before loading the model: join the process group, check and resolve ``cfg.deepspeed``.

    Under ZeRO-3 the resolved config is registered with transformers, so ``from_pretrained`` builds
    every parameter already partitioned across ranks (never the whole model on one rank).
    """
    global _hf_deepspeed_config
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    init_distributed()
    ds = load_ds_config(cfg.deepspeed)
    check_combination(cfg, ds)
    stage3 = zero_stage(ds) == 3
    ds = resolve_auto_values(ds, cfg, world_size(), text_hidden_size(cfg) if stage3 else None)
    unset_hf_deepspeed_config()
    _hf_deepspeed_config = HfDeepSpeedConfig(ds) if stage3 else None
    return ds


def release_deepspeed() -> None:
    """Forget the ZeRO-3 registration (the next model of this process loads whole again)."""
    global _hf_deepspeed_config
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _hf_deepspeed_config = None
    unset_hf_deepspeed_config()


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_engine(model: torch.nn.Module, cfg: Config, total_steps: int, ds_config: dict[str, Any]):
    """A DeepSpeed engine for ``model`` at any world size (1 included); ``ds_config`` is what
    ``prepare_deepspeed`` returned before the model was loaded."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    factor = warmup_cosine(total_steps, cfg.train.warmup_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=params,
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
    )
    return engine
