"""What one training forward says about the response tokens, for the task loss and the objectives.

Both families fill the same record: logits aligned with their targets, and the weight each token has
in the family's task loss (autoregressive: the mean CE over response tokens; masked diffusion: the
LLaDA loss over masked response tokens). A batch may hold several *views* of the same rows (PCR's
original and patch-perturbed images): rows ``v*n .. (v+1)*n`` are view ``v``; the task loss reads
view 0 only, and every view has the same text tokens and, for diffusion, the same noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


def response_start(scored: torch.Tensor) -> int:
    """The first position that any row of a (B, L) bool mask scores (L - 1 if none): the logits
    before it are never read, so the families compute them from there on."""
    columns = scored.any(0).nonzero()
    return int(columns[0]) if len(columns) else scored.shape[1] - 1


@dataclass
class ResponseScores:
    # L: the positions from the batch's first scored one to its end (``response_start``), not the sequence
    logits: torch.Tensor  # (views * n, L, V): position t scores targets[:, t]
    targets: torch.Tensor  # (views * n, L)
    weight: torch.Tensor  # (n, L) float: each view-0 token's weight in the task loss; 0 off the scored tokens
    views: int = 1
    copies: int = 1  # noised copies of each row inside a view (diffusion with complementary masks: 2)

    @property
    def rows(self) -> int:
        """Rows per view (``copies`` x the batch's rows)."""
        return self.weight.shape[0]

    @property
    def scored(self) -> torch.Tensor:
        """(n, L) bool: the tokens the task loss scores (diffusion: the masked response tokens)."""
        return self.weight > 0

    def view(self, v: int) -> torch.Tensor:
        """Logits of view ``v``, (n, L, V)."""
        return self.logits[v * self.rows:(v + 1) * self.rows]

    @cached_property
    def token_ce(self) -> torch.Tensor:
        """(n, L) cross-entropy of view 0 on its scored tokens (0 elsewhere), in float32."""
        scored = self.scored
        ce = torch.zeros(self.weight.shape, dtype=torch.float32, device=self.weight.device)
        ce[scored] = F.cross_entropy(self.view(0)[scored].float(), self.targets[: self.rows][scored], reduction="none")
        return ce

    def sample_losses(self) -> torch.Tensor:
        """(n,) mean CE over each row's scored tokens (0 for a row with none): comparable across rows."""
        scored = self.scored
        return self.token_ce.sum(1) / scored.sum(1).clamp(min=1)

    def task_loss(self, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The task loss, each token's term times ``scale`` ((n, 1) per row or (n, L) per token) if given."""
        terms = self.token_ce * self.weight
        return (terms if scale is None else terms * scale).sum()
