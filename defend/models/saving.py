"""Write a trained model (or adapter) folder in one atomic step, from rank 0 only."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from defend.atomic import atomic_dir
from defend.engine.distributed import rank


def save_model_folder(model: torch.nn.Module, target: Path, processor: Any | None = None) -> Path:
    """``save_pretrained`` of ``model`` (and ``processor``) into ``target``: peft models write an adapter."""
    if rank() == 0:
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            if processor is not None:
                processor.save_pretrained(tmp)
    return target
