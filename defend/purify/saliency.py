"""Which vision tokens a prediction leans on: per-token scores for DiSP's masking.

``saliency`` measures how much the first generation step's output distribution (the first block of a
masked-diffusion answer, fully masked) moves when a vision token moves, through the Fisher metric
``F = diag(p) - p p^T`` of that distribution, in one of two ways (``purify.saliency``):

- ``directional`` (DiSP's own code, ``generate_prompt_mask_kl_approx``): the second-order change of the
  output KL when token i moves to what masking puts there, ``s_i = 0.5 d_i^T J_i^T F J_i d_i`` with
  ``d_i = replacement_i - e_i``, over the ``top_k`` most likely words of each position, estimated with
  Hutchinson probes ``q ~ N(0, F)``: ``s_i = 0.5 E_q[(g_i . d_i)^2]``, ``g_i = d<q, logits>/d e_i``;
- ``trace``: every direction alike, ``trace(J_i^T F J_i) = E_y ||d log p(y)/d e_i||^2`` with ``y``
  drawn from the model's own distribution (the Fisher identity).

Both use ``K`` probes (``purify.saliency_samples``): the batch is repeated K times, each copy draws its
own, and one backward pass gives every copy's gradients (rows do not interact), so the cost is one
forward and one backward of K x the batch. ``attention``: the attention the last prompt position pays
to each vision token (mean over layers and heads). ``random``: a baseline.
"""
from __future__ import annotations

from typing import Any

import torch

from defend.models.vision_tokens import VisionTokens


def repeat_rows(batch: dict[str, Any], k: int) -> dict[str, Any]:
    return {key: v.repeat(k, *[1] * (v.dim() - 1)) if torch.is_tensor(v) else v for key, v in batch.items()}


def vision_token_gradients(vlm, batch: dict[str, Any], tokens: VisionTokens, samples: int,
                           objective) -> torch.Tensor:
    """(K * N, hidden): the gradient of ``objective(logits)`` (a scalar of the first step's (K*B, P, V)
    logits, float32) with respect to every vision token of each of the batch's ``samples`` copies."""
    repeated = repeat_rows(batch, samples)
    leaf = tokens.features.detach().repeat(samples, 1).requires_grad_(True)
    trainable = [p for p in vlm.model.parameters() if p.requires_grad]
    try:  # only the vision tokens need gradients: the forward keeps nothing for the weights
        for p in trainable:
            p.requires_grad_(False)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(vlm.first_step_logits(repeated, leaf).float()), leaf)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return grad


def fisher_saliency(vlm, batch: dict[str, Any], tokens: VisionTokens, samples: int,
                    generator: torch.Generator) -> torch.Tensor:
    """(N,): ``trace``: ``mean_k ||grad_{e_i} log p(y_k)||^2`` at the first generation step, per vision token."""

    def sampled_log_likelihood(logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=-1)
        probs = logp.detach().exp().flatten(0, 1)
        drawn = torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
        return logp.flatten(0, 1).gather(1, drawn).sum()

    grad = vision_token_gradients(vlm, batch, tokens, samples, sampled_log_likelihood)
    return grad.float().pow(2).sum(-1).reshape(samples, -1).mean(0)


def directional_saliency(vlm, batch: dict[str, Any], tokens: VisionTokens, fill: torch.Tensor, samples: int,
                         generator: torch.Generator, top_k: int = 5) -> torch.Tensor:
    """(N,) float64: ``directional``: ``0.5 E_q[(g_i . (fill_i - e_i))^2]``, ``q ~ N(0, F)`` on each
    position's ``top_k`` logits (DiSP's code: top 5, float64 scores)."""

    def probe(logits: torch.Tensor) -> torch.Tensor:
        top = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values  # (K*B, P, k), differentiable
        p = torch.softmax(top.detach(), dim=-1)
        z = torch.randn(p.shape, generator=generator, device=generator.device).to(p.device)
        root = p.sqrt()  # q = (diag(sqrt p) - p sqrt(p)^T) z has covariance diag(p) - p p^T
        q = root * z - p * (root * z).sum(-1, keepdim=True)
        return (q * top).sum()

    grad = vision_token_gradients(vlm, batch, tokens, samples, probe)
    direction = (fill - tokens.features).detach().double().repeat(samples, 1)
    return 0.5 * (grad.double() * direction).sum(-1).pow(2).reshape(samples, -1).mean(0)


def attention_saliency(vlm, batch: dict[str, Any], tokens: VisionTokens) -> torch.Tensor:
    """(N,): attention from the last prompt position to each vision token (mean over layers and heads)."""
    with torch.no_grad():
        model = vlm.base_model
        previous = model.config._attn_implementation
        model.set_attn_implementation("eager")  # attention weights are only returned by the eager kernel
        positions = vlm.image_positions(batch["input_ids"])
        try:
            with vlm.injected_vision_tokens(positions, tokens.features):
                out = model(**vlm.prompt_inputs(batch), output_attentions=True)
        finally:
            model.set_attn_implementation(previous)
        attentions = out.attentions if getattr(out, "attentions", None) else out.language_model_outputs.attentions
        attention = torch.stack(attentions).float().mean((0, 2))[:, -1]  # (B, L): last prompt position
        return attention[positions]


def random_saliency(tokens: VisionTokens, generator: torch.Generator) -> torch.Tensor:
    features = tokens.features
    return torch.rand(features.shape[0], generator=generator, device=generator.device).to(features.device)


def vision_token_scores(vlm, batch: dict[str, Any], selection: str, samples: int, generator: torch.Generator,
                        tokens: VisionTokens | None = None, saliency: str = "directional",
                        fill: torch.Tensor | None = None, top_k: int = 5) -> torch.Tensor:
    """(N,): a score for every vision token of the batch (``tokens``: its ``vision_tokens`` if already
    computed; ``fill``: what masking would put in each token's place, for ``directional``; the
    image's mean token if not given)."""
    if tokens is None:
        with torch.no_grad():
            tokens = vlm.vision_tokens(batch)
    if selection == "saliency" and saliency == "directional":
        if fill is None:
            from defend.purify.replacement import replacement_rows

            fill = replacement_rows(vlm, tokens, "mean")
        return directional_saliency(vlm, batch, tokens, fill, samples, generator, top_k)
    if selection == "saliency" and saliency == "trace":
        return fisher_saliency(vlm, batch, tokens, samples, generator)
    if selection == "saliency":
        raise ValueError(f"unknown purify.saliency '{saliency}' (directional or trace)")
    if selection == "attention":
        return attention_saliency(vlm, batch, tokens)
    if selection == "random":
        return random_saliency(tokens, generator)
    raise ValueError(f"unknown selection '{selection}' (saliency, attention or random)")
