"""SIG (Barni et al. 2019): add ``amplitude * sin(2 pi j f / width)`` to every column j."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from defend.data.attacks import ATTACKS
from defend.data.attacks.trigger import Trigger


@dataclass
class SigConfig:
    amplitude: float = 60.0  # in 0-255 pixel units
    frequency: float = 6.0  # periods over the image's width


@ATTACKS.register("sig", config=SigConfig)
class SinusoidTrigger(Trigger):
    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        w = img.shape[1]
        wave = self.params.amplitude * np.sin(2 * np.pi * np.arange(w) * self.params.frequency / w)
        return np.clip(np.rint(img.astype(np.float32) + wave[None, :, None]), 0, 255).astype(np.uint8)
