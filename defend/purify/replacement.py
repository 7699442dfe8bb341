"""What a masked vision token becomes."""
from __future__ import annotations

import torch

from defend.models.vision_tokens import VisionTokens


def replacement_rows(vlm, tokens: VisionTokens, replacement: str) -> torch.Tensor:
    """What a masked vision token becomes, one row per token: ``mask`` (the mask token's input
    embedding; masked-diffusion models), ``pad`` (the pad token's), ``zero``, or ``mean`` (the mean of
    that image's vision tokens)."""
    features = tokens.features
    if replacement == "zero":
        return torch.zeros_like(features)
    if replacement == "mean":
        means = torch.stack([image.mean(0) for image in tokens.split(features)])
        return means.repeat_interleave(torch.tensor(tokens.counts, device=features.device), dim=0)
    token_id = vlm.mask_token_id if replacement == "mask" else vlm.tokenizer.pad_token_id
    if token_id is None:
        raise ValueError(f"purify.replacement={replacement}: the tokenizer has no {replacement} token")
    return vlm.token_embedding(token_id).to(features.dtype).expand_as(features)
