"""What a vision-language architecture must tell the rest of ``defend``, with LLaVA's answers as defaults.

Every defense talks to a model through one seam: the language model's input embeddings. The vision
tokens of a batch are the rows of ``inputs_embeds`` at the image placeholder positions, exactly as
the model's own ``forward`` built them (projected, anyres-packed with newline tokens, PaliGemma's
scaling, Qwen2-VL's merged patches); DiSP reads them there and writes edited ones back there with a
forward pre-hook on the language model (``defend.models.vision_tokens``), so the model's own
``forward`` and ``generate`` (M-RoPE, prefix-LM masks, anyres packing, KV cache) stay untouched and
gradients reach the edited tokens. An architecture file says where that seam is, which modules are
vision-side, how PCR perturbs its pixel tensors, and how a tiny random-init copy is built.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from defend.config import ConfigError


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a padded row reads like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# (N, C, H, W) -> (N, C, H, W): a perturbation of whole images (PCR's patch augmentation)
ImagePerturbation = Callable[[torch.Tensor], torch.Tensor]


class Architecture:
    """One family of transformers' vision-language classes (a ``model_type``)."""

    model_type: str = ""  # the config.json ``model_type`` this adapter serves
    tiny_arch: str | None = None  # its ``tiny.arch`` name, when it has a tiny builder
    # submodule names of the image side, kept in full precision under QLoRA, never LoRA targets unless
    # named: the encoder (frozen by train.freeze_vision_tower; LoRA alias ``vision_tower``), other
    # vision-side modules, and what maps vision features into the language model (alias ``projector``)
    vision_tower: str = "vision_tower"
    vision_extra: tuple[str, ...] = ()
    projector: tuple[str, ...] = ("multi_modal_projector",)
    # batch keys that only feed the vision tower: left out of calls whose vision tokens are injected
    pixel_inputs: tuple[str, ...] = ("pixel_values",)
    # masked diffusion (a bidirectional text model) is supported on this layout
    diffusion: bool = False

    def __init__(self, config: Any = None):
        self.config = config  # the model's config (None: only the names and the tiny builder are used)

    def vision_modules(self) -> tuple[str, ...]:
        return (self.vision_tower, *self.vision_extra, *self.projector)

    def image_token_id(self, config: Any) -> int:
        token = getattr(config, "image_token_id", None)
        return config.image_token_index if token is None else token

    def language_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose ``inputs_embeds`` hold the merged vision tokens (the seam)."""
        return model.model.language_model

    def keeps_pixels(self) -> bool:
        """Whether a call with injected vision tokens still needs the pixel inputs (BLIP-2's forward
        and generate run the vision tower unconditionally)."""
        return False

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Positions of a left-padded batch as ``generate`` assigns them (None: the model derives them)."""
        return position_ids_for(attention_mask)

    def perturb_pixels(self, batch: dict[str, Any], perturb: ImagePerturbation) -> torch.Tensor:
        """``pixel_values`` with every image (every crop, for anyres models) perturbed by ``perturb``."""
        pixels = batch["pixel_values"]
        if pixels.dim() != 4:
            raise ValueError(f"{self.model_type}: expected pixel_values as (N, C, H, W), got {tuple(pixels.shape)}")
        return perturb(pixels)

    # the vision tower on its own (pretrain_vision): a batch of images, one pooled vector each, a flip
    def process_images(self, image_processor: Any, images: list) -> dict[str, torch.Tensor]:
        """The image processor's tensors for a batch of images, one image per sample."""
        out = image_processor(images=images, return_tensors="pt")
        return {k: v for k, v in out.items() if torch.is_tensor(v)}

    def pooled_size(self) -> int:
        """Width of ``pooled_image_features``."""
        return self.config.vision_config.hidden_size

    def pooled_image_features(self, tower: torch.nn.Module, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, pooled_size): one vector per image of the image processor's output ``pixels``."""
        return pooled_vit_features(tower, pixels["pixel_values"])

    def patch_tokens(self, tower: torch.nn.Module, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, patches, hidden): the encoder's last hidden states at each image's patch tokens, in the
        order of ``whole_images``' patches (pretrain_vision's pixel reconstruction reads them)."""
        return vit_patch_tokens(tower, pixels["pixel_values"])

    def whole_images(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C, H, W): each image as the encoder sees it whole."""
        return pixels["pixel_values"]

    def hflip(self, pixels: dict[str, torch.Tensor], flip: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels`` with the images where ``flip`` (N,) is true mirrored left to right."""
        values = pixels["pixel_values"]
        where = flip.reshape(-1, *[1] * (values.dim() - 1)).to(values.device)
        return {**pixels, "pixel_values": torch.where(where, values.flip(-1), values)}

    def build_tiny(self, tiny: Any, family: str) -> tuple[torch.nn.Module, Any]:
        """A random-init model of this layout and its processor, from ``TinyConfig`` sizes."""
        raise NotImplementedError(f"{self.model_type} has no tiny builder")


class AnyResArchitecture(Architecture):
    """LLaVA-NeXT / LLaVA-OneVision: each image is a base view plus high-resolution crops,
    ``pixel_values`` (N, crops, C, H, W) zero-padded to the batch's most crops."""

    def perturb_pixels(self, batch: dict[str, Any], perturb: ImagePerturbation) -> torch.Tensor:
        pixels = batch["pixel_values"]
        if pixels.dim() != 5:
            raise ValueError(f"{self.model_type}: expected pixel_values as (N, crops, C, H, W), got"
                             f" {tuple(pixels.shape)}")
        return perturb(pixels.flatten(0, 1)).reshape(pixels.shape)  # padding crops are never read

    def whole_image(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, C, H, W): the view of each image that shows all of it (LLaVA-NeXT/OneVision: the first)."""
        return pixels["pixel_values"][:, 0]

    def pooled_image_features(self, tower: torch.nn.Module, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        return pooled_vit_features(tower, self.whole_image(pixels))

    def patch_tokens(self, tower: torch.nn.Module, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        return vit_patch_tokens(tower, self.whole_image(pixels))

    def whole_images(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.whole_image(pixels)

    # hflip (inherited) mirrors every crop in place: exact for the whole-image view, which is what is pooled


def pooled_vit_features(tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Mean of the encoder's last hidden states over its patch tokens: one vector per image."""
    return vit_patch_tokens(tower, pixel_values).mean(dim=1)


def vit_patch_tokens(tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The encoder's last hidden states at its patch tokens (a CLS token left out, as LLaVA-style models
    drop it too), (N, patches, hidden)."""
    try:
        hidden = tower(pixel_values=pixel_values).last_hidden_state
    except TypeError as err:
        raise ConfigError(
            f"{type(tower).__name__} does not take a plain pixel_values batch ({err}); its architecture"
            " adapter (defend/models/archs/) must pool its features itself (pooled_image_features)."
        ) from err
    config = tower.config
    n_patches = (config.image_size // config.patch_size) ** 2 if hasattr(config, "patch_size") else None
    if n_patches is not None and hidden.shape[1] == n_patches + 1:
        hidden = hidden[:, 1:]
    return hidden
