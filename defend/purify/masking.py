"""DiSP's masked inference: replace the top-scored vision tokens of each image, then generate."""
from __future__ import annotations

from typing import Any

import torch

from defend.config import ConfigError
from defend.purify.replacement import replacement_rows
from defend.purify.saliency import vision_token_scores


def top_fraction(scores: torch.Tensor, counts: list[int], ratio: float) -> torch.Tensor:
    """(N,) bool: each image's ``round(ratio * tokens)`` highest-scored tokens (``counts``: tokens per image)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    start = 0
    for n in counts:
        k = round(ratio * n)
        if k:
            chosen[start + scores[start: start + n].topk(k).indices] = True
        start += n
    return chosen


def masked_features(vlm, batch: dict[str, Any], ratio: float, selection: str, replacement: str, samples: int,
                    generator: torch.Generator, saliency: str = "directional",
                    top_k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's vision tokens (N, hidden) with the top ``ratio`` of each image replaced; and the (N,)
    mask of which were (``saliency``, ``top_k``: how ``selection=saliency`` scores, ``purify.*``)."""
    with torch.no_grad():
        tokens = vlm.vision_tokens(batch)  # once: scored, then edited
        fill = replacement_rows(vlm, tokens, replacement)
    scores = vision_token_scores(vlm, batch, selection, samples, generator, tokens, saliency=saliency, fill=fill,
                                 top_k=top_k)
    chosen = top_fraction(scores, tokens.counts, ratio)
    return torch.where(chosen.unsqueeze(1), fill, tokens.features), chosen


def check_purify_settings(purify, family: str) -> str:
    """Refuse ``purify.*`` values that cannot work (before any model loads); the replacement to use."""
    # auto: mean, the replacement measured best on both families (docs/disp.md, "Replacement")
    replacement = "mean" if purify.replacement == "auto" else purify.replacement
    if not 0 <= purify.mask_ratio < 1:
        raise ConfigError(f"purify.mask_ratio must be in [0, 1), got {purify.mask_ratio}.")
    if purify.saliency_samples < 1 or purify.saliency_top_k < 1:
        raise ConfigError(f"purify.saliency_samples and purify.saliency_top_k must be >= 1, got"
                          f" {purify.saliency_samples} and {purify.saliency_top_k}.")
    if replacement == "mask" and family != "mdlm":
        raise ConfigError("purify.replacement=mask needs a masked-diffusion model (model.family=mdlm);"
                          " use pad, zero or mean.")
    return replacement


class MaskedGenerator:
    """``purify.*`` settings bound to a model: ``generator(batch) -> answers`` with masking."""

    def __init__(self, vlm, purify):
        self.vlm, self.cfg = vlm, purify
        self.replacement = check_purify_settings(purify, vlm.family)
        # on the model's device: saliency draws labels from, and random selection scores, tensors there
        device = next(vlm.model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(purify.seed)

    def __call__(self, batch: dict[str, Any]) -> list[str]:
        c = self.cfg
        return masked_generate(self.vlm, batch, c.mask_ratio, c.selection, self.replacement, c.saliency_samples,
                               self.generator, saliency=c.saliency, top_k=c.saliency_top_k)


def masked_generate(vlm, batch: dict[str, Any], ratio: float, selection: str, replacement: str, samples: int,
                    generator: torch.Generator, saliency: str = "directional", top_k: int = 5) -> list[str]:
    """Greedy answers with the top ``ratio`` vision tokens of each image masked (``ratio`` 0: plain)."""
    if ratio <= 0 or not vlm.image_positions(batch["input_ids"]).any():
        return vlm.generate(batch)
    features, _ = masked_features(vlm, batch, ratio, selection, replacement, samples, generator, saliency, top_k)
    return vlm.generate(batch, features=features)
