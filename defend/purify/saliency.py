"""Which vision tokens a prediction leans on: per-token scores for DiSP's masking.

``saliency``: the curvature of the first generation step's output distribution with respect to each
vision token's embedding, ``s_i = E_y ||d log p(y | x) / d e_i||^2`` with ``y`` sampled from the
model's own first-step distribution. By the Fisher identity this is ``trace(J_i^T F J_i)``, the
Fisher-Jacobian form of DiSP (arXiv 2602.22246), estimated with ``K`` sampled labels: the batch is
repeated K times, each copy draws its own labels, and one backward pass gives every copy's
gradients (rows do not interact), so the cost is one forward and one backward of K x the batch.
``attention``: the attention the last prompt position pays to each vision token (mean over
layers and heads). ``random``: a baseline.
"""
from __future__ import annotations

from typing import Any

import torch


def tokens_per_image(batch: dict[str, Any], features: torch.Tensor) -> int:
    n_images = batch["pixel_values"].shape[0]
    return features.shape[0] // n_images


def repeat_rows(batch: dict[str, Any], k: int) -> dict[str, Any]:
    return {key: v.repeat(k, *[1] * (v.dim() - 1)) if torch.is_tensor(v) else v for key, v in batch.items()}


def fisher_saliency(vlm, batch: dict[str, Any], samples: int, generator: torch.Generator,
                    features: torch.Tensor | None = None) -> torch.Tensor:
    """(n_images, tokens_per_image): ``mean_k ||grad_{e_i} log p(y_k)||^2`` at the first generation step."""
    if features is None:
        with torch.no_grad():
            features = vlm.image_features(batch)
    per_image = tokens_per_image(batch, features)
    repeated = repeat_rows(batch, samples)
    leaf = features.detach().repeat(samples, 1).requires_grad_(True)
    trainable = [p for p in vlm.model.parameters() if p.requires_grad]
    try:  # only the vision tokens need gradients: the forward keeps nothing for the weights
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            logits = vlm.first_step_logits(repeated, leaf).float()  # (K*B, P, V)
            logp = torch.log_softmax(logits, dim=-1)
            drawn = torch.multinomial(logp.detach().exp().flatten(0, 1), 1, generator=generator)
            chosen = logp.flatten(0, 1).gather(1, drawn).sum()
            (grad,) = torch.autograd.grad(chosen, leaf)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    scores = grad.float().pow(2).sum(-1)  # (K * n_tokens,)
    return scores.reshape(samples, -1, per_image).mean(0)


def attention_saliency(vlm, batch: dict[str, Any], features: torch.Tensor | None = None) -> torch.Tensor:
    """(n_images, tokens_per_image): attention from the last prompt position to each vision token."""
    with torch.no_grad():
        features = vlm.image_features(batch) if features is None else features
        per_image = tokens_per_image(batch, features)
        model = vlm.model
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")  # attention weights are only returned by the eager kernel
        try:
            mask = batch["attention_mask"]
            out = model(inputs_embeds=vlm.embed(batch["input_ids"], features), attention_mask=mask,
                        position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0), output_attentions=True)
        finally:
            model.set_attn_implementation(previous)
        attention = torch.stack(out.attentions).float().mean((0, 2))[:, -1]  # (B, L): last prompt position
        image = batch["input_ids"] == model.config.image_token_id
        return attention[image].reshape(-1, per_image)


def random_saliency(vlm, batch: dict[str, Any], generator: torch.Generator,
                    features: torch.Tensor | None = None) -> torch.Tensor:
    if features is None:
        with torch.no_grad():
            features = vlm.image_features(batch)
    per_image = tokens_per_image(batch, features)
    return torch.rand(features.shape[0] // per_image, per_image, generator=generator)


def vision_token_scores(vlm, batch: dict[str, Any], selection: str, samples: int, generator: torch.Generator,
                        features: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of every vision token, (n_images, tokens_per_image); ``features``: the batch's
    ``image_features`` if already computed."""
    if selection == "saliency":
        return fisher_saliency(vlm, batch, samples, generator, features)
    if selection == "attention":
        return attention_saliency(vlm, batch, features)
    if selection == "random":
        return random_saliency(vlm, batch, generator, features)
    raise ValueError(f"unknown selection '{selection}' (saliency, attention or random)")
