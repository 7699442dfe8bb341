"""The trigger interface: a deterministic image and prompt transform, built from the attack's settings.

Every trigger's pattern (noise patch, blend key, warp field) is drawn once from ``attack.seed``, so all
poisoned samples carry the same trigger; only a ``random`` patch location varies per sample, drawn
from a per-sample generator. Each attack is one file of this package: its settings' dataclass and its
trigger class, registered with ``@ATTACKS.register("name", config=ItsConfig)`` (docs/extending.md).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from defend.config import AttackConfig
from defend.data.attacks import ATTACKS


class Trigger:
    """Identity trigger; subclasses change the image, the prompt, or both. ``params`` is the attack's own
    settings (``attack.<name>``), ``attack`` the whole section (seed, target)."""

    def __init__(self, params: Any, attack: AttackConfig):
        self.params = params
        self.attack = attack
        self.pattern_rng = np.random.default_rng(attack.seed)

    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return img

    def prompt(self, prompt: str) -> str:
        return prompt


def build_trigger(cfg: AttackConfig) -> Trigger:
    """The trigger of ``attack.name`` with its settings ``attack.<name>``."""
    return ATTACKS.get(cfg.name).impl(cfg.params, cfg)
