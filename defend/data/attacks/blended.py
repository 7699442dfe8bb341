"""Blended (Chen et al. 2017): ``(1 - alpha) * image + alpha * key`` over the whole image."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from defend.config import ConfigError
from defend.data.attacks import ATTACKS
from defend.data.attacks.trigger import Trigger


@dataclass
class BlendedConfig:
    key_image: str = "noise"  # "noise" (uniform, drawn from attack.seed), skimage:NAME, or an image path
    alpha: float = 0.15

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"attack.blended.alpha must be in (0, 1], got {self.alpha}.")


def load_key_image(spec: str) -> np.ndarray:
    """``skimage:NAME`` (a photo shipped with scikit-image) or a path to an image file."""
    if spec.startswith("skimage:"):
        import skimage.data

        name = spec.split(":", 1)[1]
        loader = getattr(skimage.data, name, None)
        if loader is None or not callable(loader):
            raise ConfigError(f"attack.blended.key_image: scikit-image has no image '{name}' (try skimage:astronaut).")
        array = loader()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"attack.blended.key_image: '{spec}' does not exist; give an image path, skimage:NAME"
                              " or noise.")
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array[..., :3].astype(np.uint8)


@ATTACKS.register("blended", config=BlendedConfig)
class BlendTrigger(Trigger):
    def __init__(self, params: BlendedConfig, attack):
        super().__init__(params, attack)
        self.key = None if params.key_image == "noise" else load_key_image(params.key_image)
        self._sized: dict[tuple[int, int], np.ndarray] = {}

    def key_for(self, h: int, w: int) -> np.ndarray:
        if (h, w) not in self._sized:
            if self.key is None:
                key = np.random.default_rng(self.attack.seed).integers(0, 256, (h, w, 3)).astype(np.float32)
            else:
                key = np.asarray(Image.fromarray(self.key).resize((w, h), Image.BILINEAR), dtype=np.float32)
            self._sized[(h, w)] = key
        return self._sized[(h, w)]

    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = self.params.alpha
        mixed = (1 - a) * img.astype(np.float32) + a * self.key_for(*img.shape[:2])
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
