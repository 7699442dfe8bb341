"""The vision side of a vision-language model: find its encoder, copy one in."""
from __future__ import annotations

from pathlib import Path

import torch

from defend.config import ConfigError

def find_vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    """The image encoder inside ``model`` (a peft wrapper included), named by its architecture adapter."""
    from defend.models.archs import architecture

    name = architecture(model.config).vision_tower
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] == name:
            return module
    raise ConfigError(
        f"{type(model).__name__}: no vision encoder found (no submodule named '{name}');"
        " train.freeze_vision_tower and pretrain_vision need one."
    )


def load_vision_tower(model: torch.nn.Module, folder: str | Path, trust_remote_code: bool = False) -> None:
    """Copy the vision encoder of the model saved in ``folder`` (same architecture) into ``model``.

    The source is loaded with ``from_pretrained``, so checkpoint key layouts never matter.
    """
    from transformers import AutoModelForImageTextToText

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.vision_tower_from: '{folder}' is not a model folder (no config.json).")
    tower = find_vision_tower(model)
    dtype = next(tower.parameters()).dtype
    source = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        tower.load_state_dict(find_vision_tower(source).state_dict(), strict=True)
    except RuntimeError as err:
        raise ConfigError(
            f"model.vision_tower_from: the vision encoder in '{folder}' does not fit this model's"
            f" ({str(err)[:300]}); both must have the same vision architecture and sizes."
        ) from err
