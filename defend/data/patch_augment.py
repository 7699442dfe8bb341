"""Patch-level image perturbation (PCR's second view): split each image into square patches and
perturb a fraction of them, leaving every other pixel as it was."""
from __future__ import annotations

import torch

MODES = ("shuffle", "mask", "noise")


def chosen_patches(n_images: int, n_patches: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(n_images, n_patches) bool: ``round(fraction * n_patches)`` patches of each image, drawn at random."""
    k = round(fraction * n_patches)
    ranks = torch.rand(n_images, n_patches, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < k


def patch_augment(pixels: torch.Tensor, patch_size: int, fraction: float, mode: str,
                  generator: torch.Generator, noise_std: float = 1.0) -> torch.Tensor:
    """A perturbed copy of ``pixels`` (N, C, H, W; the processor's normalised values).

    ``mode``: ``shuffle`` moves every chosen patch to another chosen position (the image keeps its
    pixels, their arrangement changes), ``mask`` sets them to 0 (the dataset mean after the
    processor's normalisation), ``noise`` adds Gaussian noise of ``noise_std``. A border that does
    not fill a whole patch is never touched.
    """
    if pixels.dim() != 4:
        raise ValueError(f"patch augmentation needs images as (N, C, H, W), got shape {tuple(pixels.shape)}")
    n, c, h, w = pixels.shape
    rows, cols = h // patch_size, w // patch_size
    if rows == 0 or cols == 0:
        raise ValueError(f"patch size {patch_size} is larger than the {w}x{h} image")
    body = pixels[:, :, : rows * patch_size, : cols * patch_size]
    # (N, P, C, s, s) with P = rows * cols, row-major
    patches = body.reshape(n, c, rows, patch_size, cols, patch_size).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, rows * cols, c, patch_size, patch_size)
    chosen = chosen_patches(n, rows * cols, fraction, generator).to(pixels.device)
    out = patches.clone()
    if mode == "shuffle":
        for i in range(n):
            # a random cycle through the chosen positions: every chosen patch moves (with 2 or more)
            where = chosen[i].nonzero().squeeze(1)
            cycle = where[torch.randperm(len(where), generator=generator).to(pixels.device)]
            out[i, cycle] = patches[i, cycle.roll(1)]
    elif mode == "mask":
        out[chosen] = 0
    elif mode == "noise":
        noise = torch.randn(out[chosen].shape, generator=generator).to(pixels.device, pixels.dtype)
        out[chosen] = out[chosen] + noise_std * noise
    else:
        raise ValueError(f"unknown patch augmentation mode '{mode}' (one of {', '.join(MODES)})")
    out = out.reshape(n, rows, cols, c, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    result = pixels.clone()
    result[:, :, : rows * patch_size, : cols * patch_size] = out.reshape(n, c, rows * patch_size, cols * patch_size)
    return result
