"""One interface, two families: autoregressive MLLMs and masked-diffusion MLLMs."""
from __future__ import annotations

from defend.config import Config
from defend.models.autoregressive import AutoregressiveVLM
from defend.models.base import VisionLanguageModel
from defend.models.diffusion import MaskedDiffusionVLM

FAMILIES = {"mllm": AutoregressiveVLM, "mdlm": MaskedDiffusionVLM}


def load_model(cfg: Config, train_adapter: bool = False) -> VisionLanguageModel:
    """Load ``cfg.model`` (and its adapter, if any: trainable with ``train_adapter``) as the family's wrapper."""
    from defend.models.loading import load_pretrained

    model, processor = load_pretrained(cfg, train_adapter)
    return FAMILIES[cfg.model.family](model, processor, cfg)


__all__ = ["FAMILIES", "AutoregressiveVLM", "MaskedDiffusionVLM", "VisionLanguageModel", "load_model"]
