"""One interface, two families: autoregressive MLLMs and masked-diffusion MLLMs.

Nothing heavy is imported with the package: ``defend.models.scoring`` (what an objective needs) does not
pull in transformers' model classes; ``load_model`` and the family classes import them when used."""
from __future__ import annotations

from typing import TYPE_CHECKING

from defend.config import Config

if TYPE_CHECKING:
    from defend.models.base import VisionLanguageModel


def families() -> dict[str, type]:
    """``model.family`` -> its wrapper class."""
    from defend.models.autoregressive import AutoregressiveVLM
    from defend.models.diffusion import MaskedDiffusionVLM

    return {"mllm": AutoregressiveVLM, "mdlm": MaskedDiffusionVLM}


def load_model(cfg: Config, train_adapter: bool = False) -> VisionLanguageModel:
    """Load ``cfg.model`` (and its adapter, if any: trainable with ``train_adapter``) as the family's wrapper."""
    from defend.models.loading import load_pretrained

    model, processor = load_pretrained(cfg, train_adapter)
    return families()[cfg.model.family](model, processor, cfg)


def __getattr__(name: str):  # the family classes by name, imported on first use
    if name in ("AutoregressiveVLM", "MaskedDiffusionVLM", "VisionLanguageModel"):
        from defend.models import autoregressive, base, diffusion

        return {"AutoregressiveVLM": autoregressive.AutoregressiveVLM, "MaskedDiffusionVLM": diffusion.MaskedDiffusionVLM,
                "VisionLanguageModel": base.VisionLanguageModel}[name]
    raise AttributeError(f"module 'defend.models' has no attribute {name!r}")


__all__ = ["AutoregressiveVLM", "MaskedDiffusionVLM", "VisionLanguageModel", "families", "load_model"]
