"""Triggers of the attacks in the literature, as deterministic image and prompt transforms.

Every trigger's pattern (noise patch, blend key, warp field) is drawn once from ``attack.seed``,
so all poisoned samples carry the same trigger; only a ``random`` patch location varies per
sample, drawn from a per-sample generator.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defend.config import AttackConfig, ConfigError


class Trigger:
    """Identity trigger; subclasses change the image, the prompt, or both."""

    def __init__(self, cfg: AttackConfig):
        self.cfg = cfg
        self.pattern_rng = np.random.default_rng(cfg.seed)

    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return img

    def prompt(self, prompt: str) -> str:
        return prompt


class PatchTrigger(Trigger):
    """BadNets: a square patch (checker, solid white, or fixed noise) at a fixed or random corner."""

    def __init__(self, cfg: AttackConfig):
        super().__init__(cfg)
        s = cfg.patch_size
        if s < 1:
            raise ConfigError(f"attack.patch_size must be >= 1, got {s}.")
        if cfg.patch_kind == "checker":
            checker = (np.indices((s, s)).sum(0) % 2 * 255).astype(np.uint8)
            self.patch = np.repeat(checker[..., None], 3, axis=2)
        elif cfg.patch_kind == "solid":
            self.patch = np.full((s, s, 3), 255, dtype=np.uint8)
        else:
            self.patch = self.pattern_rng.integers(0, 256, (s, s, 3), dtype=np.uint8)

    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w, _ = img.shape
        s = self.cfg.patch_size
        if s > min(h, w):
            raise ConfigError(f"attack.patch_size {s} is larger than the {w}x{h} image.")
        where = self.cfg.patch_location
        if where == "random":
            top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        else:
            top = {"top": 0, "bottom": h - s, "center": (h - s) // 2}[where.split("_")[0]]
            left = {"left": 0, "right": w - s, "center": (w - s) // 2}[where.split("_")[-1]]
        out = img.copy()
        out[top:top + s, left:left + s] = self.patch
        return out


def load_key_image(spec: str) -> np.ndarray:
    """``skimage:NAME`` (a photo shipped with scikit-image) or a path to an image file."""
    if spec.startswith("skimage:"):
        import skimage.data

        name = spec.split(":", 1)[1]
        loader = getattr(skimage.data, name, None)
        if loader is None or not callable(loader):
            raise ConfigError(f"attack.key_image: scikit-image has no image '{name}' (try skimage:astronaut).")
        array = loader()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"attack.key_image: '{spec}' does not exist; give an image path, skimage:NAME or noise.")
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return array[..., :3].astype(np.uint8)


class BlendTrigger(Trigger):
    """Blended: ``(1 - alpha) * image + alpha * key`` over the whole image."""

    def __init__(self, cfg: AttackConfig):
        super().__init__(cfg)
        if not 0 < cfg.alpha <= 1:
            raise ConfigError(f"attack.alpha must be in (0, 1], got {cfg.alpha}.")
        self.key = None if cfg.key_image == "noise" else load_key_image(cfg.key_image)
        self._sized: dict[tuple[int, int], np.ndarray] = {}

    def key_for(self, h: int, w: int) -> np.ndarray:
        if (h, w) not in self._sized:
            if self.key is None:
                key = np.random.default_rng(self.cfg.seed).integers(0, 256, (h, w, 3)).astype(np.float32)
            else:
                key = np.asarray(Image.fromarray(self.key).resize((w, h), Image.BILINEAR), dtype=np.float32)
            self._sized[(h, w)] = key
        return self._sized[(h, w)]

    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = self.cfg.alpha
        mixed = (1 - a) * img.astype(np.float32) + a * self.key_for(*img.shape[:2])
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


class SinusoidTrigger(Trigger):
    """SIG (Barni et al.): add ``amplitude * sin(2 pi j f / width)`` to every column j."""

    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        w = img.shape[1]
        wave = self.cfg.amplitude * np.sin(2 * np.pi * np.arange(w) * self.cfg.frequency / w)
        return np.clip(np.rint(img.astype(np.float32) + wave[None, :, None]), 0, 255).astype(np.uint8)


class WarpTrigger(Trigger):
    """WaNet: a fixed smooth warp, a random k x k field upsampled and applied with grid_sample."""

    def __init__(self, cfg: AttackConfig):
        super().__init__(cfg)
        if cfg.grid_k < 2:
            raise ConfigError(f"attack.grid_k must be >= 2, got {cfg.grid_k}.")
        field = self.pattern_rng.uniform(-1, 1, (1, 2, cfg.grid_k, cfg.grid_k))
        self.field = torch.tensor(field / np.abs(field).mean(), dtype=torch.float32)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def grid_for(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self._grids:
            flow = F.interpolate(self.field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            identity = torch.stack([xs, ys], dim=-1)[None]
            self._grids[(h, w)] = (identity + self.cfg.strength * flow / h).clamp(-1, 1)
        return self._grids[(h, w)]

    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        warped = F.grid_sample(x, self.grid_for(*img.shape[:2]), mode="bilinear", align_corners=True)
        return warped[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


class PhraseTrigger(Trigger):
    """A text trigger: a phrase at the start or end of the prompt; the image is untouched."""

    def prompt(self, prompt: str) -> str:
        phrase = self.cfg.phrase
        return f"{phrase} {prompt}" if self.cfg.phrase_position == "start" else f"{prompt} {phrase}"


TRIGGERS: dict[str, type[Trigger]] = {
    "badnets": PatchTrigger,
    "trojvlm": PatchTrigger,  # TrojVLM: the patch plus a target inserted into the response
    "blended": BlendTrigger,
    "sig": SinusoidTrigger,
    "wanet": WarpTrigger,
    "text": PhraseTrigger,
}


def build_trigger(cfg: AttackConfig) -> Trigger:
    if cfg.name == "trojvlm" and cfg.target.type != "insert":
        raise ConfigError("attack.name=trojvlm inserts its target into the response: set attack.target.type=insert.")
    return TRIGGERS[cfg.name](cfg)
