"""WaNet (Nguyen & Tran 2021): a fixed smooth warp, a random k x k field upsampled and applied with grid_sample."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from defend.config import ConfigError
from defend.data.attacks import ATTACKS
from defend.data.attacks.trigger import Trigger


@dataclass
class WanetConfig:
    grid_k: int = 4  # control points per side of the warp field
    strength: float = 0.5  # s: the field's mean displacement, in pixels of the grid (published 0.5-1)

    def __post_init__(self):
        if self.grid_k < 2:
            raise ConfigError(f"attack.wanet.grid_k must be >= 2, got {self.grid_k}.")


@ATTACKS.register("wanet", config=WanetConfig)
class WarpTrigger(Trigger):
    def __init__(self, params: WanetConfig, attack):
        super().__init__(params, attack)
        field = self.pattern_rng.uniform(-1, 1, (1, 2, params.grid_k, params.grid_k))
        self.field = torch.tensor(field / np.abs(field).mean(), dtype=torch.float32)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def grid_for(self, h: int, w: int) -> torch.Tensor:
        if (h, w) not in self._grids:
            flow = F.interpolate(self.field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            identity = torch.stack([xs, ys], dim=-1)[None]
            self._grids[(h, w)] = (identity + self.params.strength * flow / h).clamp(-1, 1)
        return self._grids[(h, w)]

    def image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        warped = F.grid_sample(x, self.grid_for(*img.shape[:2]), mode="bilinear", align_corners=True)
        return warped[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
