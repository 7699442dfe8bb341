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

from defend.models.vision_tokens import VisionTokens


def repeat_rows(batch: dict[str, Any], k: int) -> dict[str, Any]:
    return {key: v.repeat(k, *[1] * (v.dim() - 1)) if torch.is_tensor(v) else v for key, v in batch.items()}


def fisher_saliency(vlm, batch: dict[str, Any], tokens: VisionTokens, samples: int,
                    generator: torch.Generator) -> torch.Tensor:
    """(N,): ``mean_k ||grad_{e_i} log p(y_k)||^2`` at the first generation step, per vision token."""
    repeated = repeat_rows(batch, samples)
    leaf = tokens.features.detach().repeat(samples, 1).requires_grad_(True)
    trainable = [p for p in vlm.model.parameters() if p.requires_grad]
    try:  # only the vision tokens need gradients: the forward keeps nothing for the weights
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            logits = vlm.first_step_logits(repeated, leaf).float()  # (K*B, P, V)
            logp = torch.log_softmax(logits, dim=-1)
            probs = logp.detach().exp().flatten(0, 1)
            drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
            chosen = logp.flatten(0, 1).gather(1, drawn).sum()
            (grad,) = torch.autograd.grad(chosen, leaf)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return grad.float().pow(2).sum(-1).reshape(samples, -1).mean(0)


def attention_saliency(vlm, batch: dict[str, Any], tokens: VisionTokens) -> torch.Tensor:
    """(N,): attention from the last prompt position to each vision token (mean over layers and heads)."""
    with torch.no_grad():
        model = vlm.base_model
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")  # attention weights are only returned by the eager kernel
        positions = vlm.image_positions(batch["input_ids"])
        inputs = vlm.inputs_without_pixels(batch)
        order = vlm.arch.position_ids(batch["attention_mask"])
        if order is not None:
            inputs["position_ids"] = order
        try:
            with vlm.injected_vision_tokens(positions, tokens.features):
                out = model(**inputs, output_attentions=True)
        finally:
            model.set_attn_implementation(previous)
        attentions = out.attentions if getattr(out, "attentions", None) else out.language_model_outputs.attentions
        attention = torch.stack(attentions).float().mean((0, 2))[:, -1]  # (B, L): last prompt position
        return attention[positions]


def random_saliency(tokens: VisionTokens, generator: torch.Generator) -> torch.Tensor:
    features = tokens.features
    return torch.rand(features.shape[0], generator=generator, device=generator.device).to(features.device)


def vision_token_scores(vlm, batch: dict[str, Any], selection: str, samples: int, generator: torch.Generator,
                        tokens: VisionTokens | None = None) -> torch.Tensor:
    """(N,): a score for every vision token of the batch (``tokens``: its ``vision_tokens`` if already
    computed)."""
    if tokens is None:
        with torch.no_grad():
            tokens = vlm.vision_tokens(batch)
    if selection == "saliency":
        return fisher_saliency(vlm, batch, tokens, samples, generator)
    if selection == "attention":
        return attention_saliency(vlm, batch, tokens)
    if selection == "random":
        return random_saliency(tokens, generator)
    raise ValueError(f"unknown selection '{selection}' (saliency, attention or random)")
