"""The LLaDA SFT loss written out in one function from the library's noise draw: the tests' oracle (the
library computes the same loss inside ``MaskedDiffusionVLM.score``, batched with its views)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from defend.models.diffusion_loss import diffusion_noise


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
    """LLaDA SFT loss for one batch (``diffusion_noise`` describes the draw and the weights).

    Args:
        logits_fn: maps noised ``input_ids`` (rows doubled with ``complementary_mask``) to logits.
        input_ids: (B, L) clean tokens.
        response_mask: (B, L) bool, True on response tokens.
        shifted_logits: position ``i-1`` predicts token ``i`` (Dream-style models).
    """
    noise = diffusion_noise(input_ids, response_mask, mask_token_id, eps, inverse_t_weight, complementary_mask,
                            generator)
    logits = align_logits(logits_fn(noise.noisy), shifted_logits)
    token_ce = F.cross_entropy(logits.float().transpose(1, 2), noise.clean, reduction="none")
    return (token_ce * noise.weight).sum()


def align_logits(logits: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Logits whose position ``i`` scores token ``i`` (Dream-style models predict it at ``i-1``)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if shifted else logits
