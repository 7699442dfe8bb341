"""Write a trained model (or adapter) folder in one atomic step, from rank 0 only.

Under ZeRO-3 every rank holds a shard of each parameter; the weights are gathered first (all ranks
take part), so the saved folder is whole and loads with ``from_pretrained`` on one process.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from defend.atomic import atomic_dir
from defend.config import MODEL_SETTINGS_FILE
from defend.engine.distributed import barrier, rank


def is_partitioned(model: torch.nn.Module) -> bool:
    """True when ZeRO-3 has sharded ``model``'s parameters."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered_state_dict(model: torch.nn.Module, engine: Any | None = None) -> dict[str, torch.Tensor] | None:
    """The full weights to save from a ZeRO-3 model (on rank 0; None elsewhere and when unsharded).

    A peft model saves its trainable (adapter) weights only, so only those are gathered; a fully
    trained model is consolidated by the engine (``stage3_gather_16bit_weights_on_model_save``).
    """
    if not is_partitioned(model):
        return None
    import deepspeed
    from peft import PeftModel

    adapter_only = isinstance(model, PeftModel)
    if engine is not None and not adapter_only:
        return engine._zero3_consolidated_16bit_state_dict()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not adapter_only]
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in named} if rank() == 0 else None


def save_model_folder(model: torch.nn.Module, target: Path, processor: Any | None = None,
                      engine: Any | None = None, settings_from: str | Path | None = None) -> Path:
    """``save_pretrained`` of ``model`` (and ``processor``) into ``target``: peft models write an adapter.
    ``settings_from``: the base folder whose ``defend_diffusion.json`` (a converted model's own settings)
    a full model folder carries on, so ``model.path=<target>`` runs as the base did.

    Every rank must call it (ZeRO-3 gathers collectively); rank 0 writes.
    """
    state = gathered_state_dict(model, engine)
    if rank() == 0:
        with atomic_dir(target) as tmp:
            if state is None:
                model.save_pretrained(tmp)
            else:
                model.save_pretrained(tmp, state_dict=state)
            if processor is not None:
                processor.save_pretrained(tmp)
            settings = Path(settings_from or "") / MODEL_SETTINGS_FILE
            if settings_from and settings.is_file() and not (tmp / "adapter_config.json").is_file():
                shutil.copy(settings, tmp / MODEL_SETTINGS_FILE)
    barrier()
    return target
