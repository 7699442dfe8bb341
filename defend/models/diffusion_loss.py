"""The masked-diffusion SFT loss's noise draw of LLaDA (and its Dream / LaViDa variants): which response
tokens are masked and each one's weight (``MaskedDiffusionVLM.score`` computes the loss from it; the
whole loss written out in one function is the tests' oracle, tests/models/diffusion_oracle.py).

Only response tokens are ever noised: the prompt and the image stay clean.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch


@dataclass
class DiffusionNoise:
    """One draw of the forward process for a batch: ``copies`` noised copies of each row (2 with
    complementary masks), stacked copy after copy."""

    noisy: torch.Tensor  # (copies * B, L) input ids with the masked response tokens replaced
    clean: torch.Tensor  # (copies * B, L) the targets
    weight: torch.Tensor  # (copies * B, L) each token's weight in the loss; 0 on unmasked tokens


def diffusion_noise(input_ids: torch.Tensor, response_mask: torch.Tensor, mask_token_id: int, eps: float = 1e-3,
                    inverse_t_weight: bool = True, complementary_mask: bool = False,
                    generator: torch.Generator | None = None) -> DiffusionNoise:
    """Per row ``t ~ U(0,1)`` and ``p = (1-eps) t + eps``; each response token is masked with
    probability ``p``. A masked token weighs ``1/p`` (LLaDA) or 1 (Dream), divided by the row's
    response length and by the number of rows that have a response (so the weights of a batch sum to
    the LLaDA loss). ``complementary_mask`` (LaViDa/Dimple) adds a second copy masked on the
    complement, weighted ``1/(1-p+eps)``."""
    batch, _ = input_ids.shape
    t = torch.rand(batch, 1, device=input_ids.device, generator=generator)
    p = (1 - eps) * t + eps
    draw = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    masked = (draw < p) & response_mask
    scales = [1.0 / p if inverse_t_weight else torch.ones_like(p)]
    masks = [masked]
    if complementary_mask:
        masks.append(~masked & response_mask)
        scales.append(1.0 / (1 - p + eps) if inverse_t_weight else torch.ones_like(p))
    masks_t = torch.cat(masks)
    clean = input_ids.repeat(len(masks), 1)
    noisy = torch.where(masks_t, torch.full_like(clean, mask_token_id), clean)
    answer_len = response_mask.sum(1, keepdim=True).clamp(min=1).repeat(len(masks), 1)
    rows = response_mask.any(1).sum().clamp(min=1)  # rows without a response (image padding) do not count
    weight = torch.cat(scales).expand_as(masks_t) * masks_t / answer_len / rows
    return DiffusionNoise(noisy, clean, weight)
