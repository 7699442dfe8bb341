"""LaViDa (``lavida``): LLaVA-OneVision whose every crop is pooled 2x2 after the projector.

LaViDa (github jacklishufan/LaViDa) runs LLaVA-OneVision's layout (SigLIP without its last layer,
a 2-layer GELU projector, anyres crops with unpadding and newline tokens) but, with its default
``ALWASY_DO_2DPOOL``, pools each crop's projected 27x27 grid to 14x14 (``get_2dPool``:
``mm_spatial_pool_mode``, bilinear by default) before packing: 196 tokens per crop instead of 729.
transformers' ``LlavaOnevisionModel`` has that pooling (``apply_pooling``) but only for video
frames, so this is the one piece of modeling code: the same model with the crops pooled before
``pack_image_features``. The text model is any transformers decoder (LaViDa-Dream: a
``Qwen2Config(is_causal=False)``). Folders come from ``defend convert lavida_dream``.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (AutoConfig, AutoModelForImageTextToText, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration)
from transformers.models.llava_onevision.modeling_llava_onevision import (LlavaOnevisionModel,
                                                                          LlavaOnevisionPreTrainedModel,
                                                                          get_anyres_image_grid_shape, unpad_image)

from defend.models.archs.llava_onevision import LlavaOneVision


@strict
class LavidaConfig(LlavaOnevisionConfig):
    model_type = "lavida"
    crop_pool_mode: Literal["bilinear", "average", "max"] = "bilinear"  # LaViDa's mm_spatial_pool_mode


def pooled_side(config: LavidaConfig) -> int:
    """A crop's grid side after ``get_2dPool(stride=2)``: 27 -> 14 bilinear (ceil), 13 average/max (floor)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return math.ceil(side / 2) if config.crop_pool_mode == "bilinear" else side // 2


class LavidaModel(LlavaOnevisionModel):
    def pool_crops(self, features: torch.Tensor) -> torch.Tensor:
        """(crops, side*side, C) -> (crops, pooled*pooled, C), as LaViDa's ``get_2dPool(stride=2)``."""
        if self.config.crop_pool_mode == "bilinear":
            return self.apply_pooling(features)  # transformers' video pooling: bilinear to ceil(side / 2)
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        grid = features.view(features.shape[0], side, side, -1).permute(0, 3, 1, 2)
        pool = nn.functional.avg_pool2d if self.config.crop_pool_mode == "average" else nn.functional.max_pool2d
        return pool(grid, 2).permute(0, 2, 3, 1).flatten(1, 2)

    def pack_image_features(self, image_features, image_sizes, image_newline=None, vision_aspect_ratio="anyres_max_9"):
        """``LlavaOnevisionModel.pack_image_features`` on the pooled crops (its grid side is the pooled one)."""
        side = pooled_side(self.config)
        max_num_patches = int(vision_aspect_ratio.strip("anyres_max_"))
        packed, lengths = [], []
        for index, crops in enumerate(image_features):
            crops = self.pool_crops(crops)
            if crops.shape[0] > 1:
                base, grid = crops[0], crops[1:]
                rows, cols = get_anyres_image_grid_shape(image_sizes[index], self.config.image_grid_pinpoints,
                                                         self.config.vision_config.image_size)
                grid = grid.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
                grid = unpad_image(grid, image_sizes[index])
                _, height, width = grid.shape
                ratio = math.sqrt(height * width / (max_num_patches * side**2))
                if ratio > 1.1:
                    grid = nn.functional.interpolate(grid[None], [int(height // ratio), int(width // ratio)],
                                                     mode="bilinear")[0]
                if image_newline is not None:
                    newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
                    grid = torch.cat((grid, newline), dim=-1)
                features = torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)
            else:
                features = crops[0]
                if image_newline is not None:
                    features = torch.cat((features, image_newline[None].to(features)), dim=0)
            packed.append(features)
            lengths.append(features.shape[0])
        return packed, torch.tensor(lengths, dtype=torch.long, device=image_features[0].device)


class LavidaForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    config_class = LavidaConfig

    def __init__(self, config: LavidaConfig):  # LlavaOnevisionForConditionalGeneration's, with LavidaModel
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = LavidaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


AutoConfig.register("lavida", LavidaConfig, exist_ok=True)
AutoModelForImageTextToText.register(LavidaConfig, LavidaForConditionalGeneration, exist_ok=True)


class Lavida(LlavaOneVision):
    """The ``llava_onevision`` adapter (same module names, vision-token seam, anyres pixels): only the
    model class differs. No tiny builder: the tiny LaViDa is the converted parity fixture."""

    model_type = "lavida"
    tiny_arch = None
    diffusion = True
