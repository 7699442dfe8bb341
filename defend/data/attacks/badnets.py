"""BadNets (Gu et al. 2017): a square patch (checker, solid white, or fixed noise) at a fixed or random corner."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from defend.config import ConfigError
from defend.data.attacks import ATTACKS
from defend.data.attacks.trigger import Trigger


@dataclass
class PatchConfig:
    size: int = 8  # in pixels of the source image
    location: Literal["bottom_right", "bottom_left", "top_right", "top_left", "center", "random"] = "bottom_right"
    kind: Literal["checker", "solid", "noise"] = "checker"

    def __post_init__(self):
        if self.size < 1:
            raise ConfigError(f"attack.<name>.size (the patch's side) must be >= 1, got {self.size}.")


@ATTACKS.register("badnets", config=PatchConfig)
class PatchTrigger(Trigger):
    def __init__(self, params: PatchConfig, attack):
        super().__init__(params, attack)
        s = params.size
        if params.kind == "checker":
            checker = (np.indices((s, s)).sum(0) % 2 * 255).astype(np.uint8)
            self.patch = np.repeat(checker[..., None], 3, axis=2)
        elif params.kind == "solid":
            self.patch = np.full((s, s, 3), 255, dtype=np.uint8)
        else:
            self.patch = self.pattern_rng.integers(0, 256, (s, s, 3), dtype=np.uint8)

    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w, _ = img.shape
        s = self.params.size
        if s > min(h, w):
            raise ConfigError(f"attack.{self.attack.name}.size {s} is larger than the {w}x{h} image.")
        where = self.params.location
        if where == "random":
            top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        else:
            top = {"top": 0, "bottom": h - s, "center": (h - s) // 2}[where.split("_")[0]]
            left = {"left": 0, "right": w - s, "center": (w - s) // 2}[where.split("_")[-1]]
        out = img.copy()
        out[top:top + s, left:left + s] = self.patch
        return out
