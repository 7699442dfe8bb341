"""DiSP's masked inference: replace the top-scored vision tokens of each image, then generate."""
from __future__ import annotations

from typing import Any

import torch

from defend.config import ConfigError
from defend.purify.saliency import vision_token_scores


def top_fraction(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """(n_images, tokens) bool: each image's ``round(ratio * tokens)`` highest-scored tokens."""
    k = round(ratio * scores.shape[1])
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        chosen.scatter_(1, scores.topk(k, dim=1).indices, True)
    return chosen


def replacement_rows(vlm, features: torch.Tensor, per_image: int, replacement: str) -> torch.Tensor:
    """What a masked vision token becomes, one row per token: ``mask`` (the mask token's input
    embedding; masked-diffusion models), ``pad`` (the pad token's), ``zero``, or ``mean`` (the mean of
    that image's vision tokens)."""
    if replacement == "zero":
        return torch.zeros_like(features)
    if replacement == "mean":
        images = features.reshape(-1, per_image, features.shape[-1])
        return images.mean(1, keepdim=True).expand_as(images).reshape_as(features)
    token_id = vlm.mask_token_id if replacement == "mask" else vlm.tokenizer.pad_token_id
    if token_id is None:
        raise ValueError(f"purify.replacement={replacement}: the tokenizer has no {replacement} token")
    return vlm.token_embedding(token_id).to(features.dtype).expand_as(features)


def masked_features(vlm, batch: dict[str, Any], ratio: float, selection: str, replacement: str, samples: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's vision tokens with the top ``ratio`` of each image replaced; and the (n_images,
    tokens) mask of which were."""
    with torch.no_grad():
        features = vlm.image_features(batch)  # once: scored, then edited
    scores = vision_token_scores(vlm, batch, selection, samples, generator, features)
    chosen = top_fraction(scores, ratio)
    with torch.no_grad():
        fill = replacement_rows(vlm, features, scores.shape[1], replacement)
        return torch.where(chosen.reshape(-1, 1), fill, features), chosen


class MaskedGenerator:
    """``purify.*`` settings bound to a model: ``generator(batch) -> answers`` with masking."""

    def __init__(self, vlm, purify):
        self.vlm, self.cfg = vlm, purify
        # auto: mean, the replacement measured best on both families (docs/disp.md, "Replacement")
        self.replacement = "mean" if purify.replacement == "auto" else purify.replacement
        if not 0 <= purify.mask_ratio < 1:
            raise ConfigError(f"purify.mask_ratio must be in [0, 1), got {purify.mask_ratio}.")
        if self.replacement == "mask" and vlm.family != "mdlm":
            raise ConfigError("purify.replacement=mask needs a masked-diffusion model (model.family=mdlm);"
                              " use pad, zero or mean.")
        self.generator = torch.Generator().manual_seed(purify.seed)

    def __call__(self, batch: dict[str, Any]) -> list[str]:
        c = self.cfg
        return masked_generate(self.vlm, batch, c.mask_ratio, c.selection, self.replacement, c.saliency_samples,
                               self.generator)


def masked_generate(vlm, batch: dict[str, Any], ratio: float, selection: str, replacement: str, samples: int,
                    generator: torch.Generator) -> list[str]:
    """Greedy answers with the top ``ratio`` vision tokens of each image masked (``ratio`` 0: plain)."""
    if ratio <= 0 or "pixel_values" not in batch:
        return vlm.generate(batch)
    features, _ = masked_features(vlm, batch, ratio, selection, replacement, samples, generator)
    return vlm.generate(batch, features=features)
