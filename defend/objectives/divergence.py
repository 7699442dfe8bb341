"""Per-token divergences and entropies of output distributions given as logits (float32, nats)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position."""
    logp, logq = F.log_softmax(p_logits.float(), dim=-1), F.log_softmax(q_logits.float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per position, in [0, log 2]."""
    logp, logq = F.log_softmax(p_logits.float(), dim=-1), F.log_softmax(q_logits.float(), dim=-1)
    logm = torch.logsumexp(torch.stack([logp, logq]), dim=0) - math.log(2)
    return 0.5 * ((logp.exp() * (logp - logm)).sum(-1) + (logq.exp() * (logq - logm)).sum(-1))


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    return kl_divergence(p_logits, q_logits) + kl_divergence(q_logits, p_logits)


def agreement(divergence: str, p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """How alike two distributions are, per position, in [0, 1]: 1 when equal, 0 when disjoint.
    ``js``: ``1 - JS / log 2``; ``sym_kl``: ``exp(-(KL(p||q) + KL(q||p)))``. Minimizing it pulls the
    distributions apart with a bounded reward (no gain beyond disjoint)."""
    if divergence == "js":
        return 1 - js_divergence(p_logits, q_logits) / math.log(2)
    if divergence == "sym_kl":
        return torch.exp(-symmetric_kl(p_logits, q_logits))
    raise ValueError(f"unknown divergence '{divergence}' (js or sym_kl)")
