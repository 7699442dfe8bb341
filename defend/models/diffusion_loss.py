"""The masked-diffusion SFT loss of LLaDA (and its Dream / LaViDa variants).

Only response tokens are ever noised: the prompt and the image stay clean.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def masked_diffusion_loss(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    mask_token_id: int,
    eps: float = 1e-3,
    inverse_t_weight: bool = True,
    complementary_mask: bool = False,
    shifted_logits: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LLaDA SFT loss for one batch.

    Per row ``t ~ U(0,1)`` and ``p = (1-eps) t + eps``; each response token is masked with
    probability ``p``; the loss is the CE on masked tokens, weighted by ``1/p`` (LLaDA) or not
    (Dream), summed per row, divided by the row's response length, averaged over the rows that have a
    response.

    Args:
        logits_fn: maps noised ``input_ids`` (rows may be doubled, see below) to logits.
        input_ids: (B, L) clean tokens.
        response_mask: (B, L) bool, True on response tokens.
        complementary_mask: also score the complement of each mask (LaViDa/Dimple): the batch
            given to ``logits_fn`` holds ``2B`` rows, mask ``m`` then ``not m`` on the response;
            the complement is weighted with ``1/(1-p+eps)``.
        shifted_logits: position ``i-1`` predicts token ``i`` (Dream-style models).
    """
    batch, _ = input_ids.shape
    t = torch.rand(batch, 1, device=input_ids.device, generator=generator)
    p = (1 - eps) * t + eps
    draw = torch.rand(input_ids.shape, device=input_ids.device, generator=generator)
    masked = (draw < p) & response_mask
    weights = [1.0 / p if inverse_t_weight else torch.ones_like(p)]
    masks = [masked]
    if complementary_mask:
        masks.append(~masked & response_mask)
        weights.append(1.0 / (1 - p + eps) if inverse_t_weight else torch.ones_like(p))
    masks_t = torch.cat(masks)
    clean = input_ids.repeat(len(masks), 1)
    noisy = torch.where(masks_t, torch.full_like(clean, mask_token_id), clean)
    logits = logits_fn(noisy)
    if shifted_logits:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    token_ce = F.cross_entropy(logits.float().transpose(1, 2), clean, reduction="none")
    weight = torch.cat(weights).expand_as(token_ce)
    answer_len = response_mask.sum(1, keepdim=True).clamp(min=1).repeat(len(masks), 1)
    per_token = token_ce * weight * masks_t / answer_len
    rows = response_mask.any(1).sum().clamp(min=1)  # rows without a response (image padding) do not count
    return per_token.sum() / rows
