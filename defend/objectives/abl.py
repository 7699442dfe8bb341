"""ABL, anti-backdoor learning (Li et al., NeurIPS 2021), as a baseline objective.

Phase 1, steps ``0 .. isolation_steps``: the loss-guided split (LGA) trains each sample towards a loss
of ``gamma`` (a sample already under it is pushed back up), and the loss of every sample seen in the
second half of the phase is recorded. At ``isolation_steps`` the lowest-loss ``isolation_ratio`` of
them are isolated: backdoor samples are learned fastest, so they sit at the bottom. Phase 2: isolated
samples drop out of the task loss, and every step adds a gradient-ascent term on a batch of them
(a second forward), bounded: a sample whose loss is above ``max_unlearn_loss`` gives no gradient.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from defend.config import ConfigError
from defend.engine.distributed import rank
from defend.models.scoring import ResponseScores
from defend.objectives.base import Objective, TrainingContext, register
from defend.objectives.settings import AblConfig
from defend.seeds import ABL_UNLEARN, derive_seed

log = logging.getLogger("defend.objectives.abl")


@register("abl", config=AblConfig)
class AntiBackdoorLearning(Objective):
    def __init__(self, ctx: TrainingContext):
        super().__init__(ctx)
        self.cfg = ctx.cfg.objective.abl
        if not 0 < self.cfg.isolation_ratio < 1:
            raise ConfigError(f"objective.abl.isolation_ratio must be in (0, 1), got {self.cfg.isolation_ratio}.")
        self.generators = {"unlearn": torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, ABL_UNLEARN, rank()))}
        self.index = {s.id: i for i, s in enumerate(ctx.samples)}
        self.losses: dict[str, float] = {}  # id -> latest loss, recorded in the second half of phase 1
        self.isolated: list[str] | None = None

    def loss_scale(self, scores: ResponseScores, batch: dict[str, Any], step: int) -> torch.Tensor:
        ids = batch["sample_ids"]
        losses = scores.sample_losses().detach()
        n = len(ids)
        if step < self.cfg.isolation_steps:
            if step >= self.cfg.isolation_steps // 2:
                self.losses.update(zip(ids, losses[:n].tolist()))
            below = (losses < self.cfg.gamma) & scores.scored.any(1)
            return (1 - 2 * below.float()).unsqueeze(1)
        if self.isolated is None:
            self.isolate()
        isolated = set(self.isolated)
        keep = torch.ones(scores.rows // scores.copies, device=losses.device)  # the padding row (if any) last
        keep[:n] = torch.tensor([i not in isolated for i in ids], dtype=keep.dtype)
        return keep.repeat(scores.copies).unsqueeze(1)

    def isolate(self) -> None:
        ranked = sorted(self.losses, key=self.losses.get)
        count = max(1, round(self.cfg.isolation_ratio * len(ranked)))
        self.isolated = ranked[:count]
        log.info("ABL isolated %d of %d samples seen (loss <= %.4f)", count, len(ranked),
                 self.losses[ranked[count - 1]] if ranked else float("nan"))

    def terms(self, scores: ResponseScores, batch: dict[str, Any], step: int, model) -> dict[str, torch.Tensor]:
        if step < self.cfg.isolation_steps or not self.isolated:
            return {"abl_unlearn": scores.logits.sum() * 0}
        cfg = self.cfg
        pick = torch.randint(len(self.isolated), (cfg.unlearn_batch_size,), generator=self.generators["unlearn"])
        chosen = [self.ctx.samples[self.index[self.isolated[i]]] for i in pick.tolist()]
        isolated = self.ctx.collate(chosen)
        device = scores.logits.device
        isolated = {k: v.to(device) if torch.is_tensor(v) else v for k, v in isolated.items()}
        losses = self.ctx.vlm.score(isolated, model=model).sample_losses()[: len(chosen)]
        return {"abl_unlearn": -cfg.unlearn_weight * losses.clamp(max=cfg.max_unlearn_loss).mean()}

    def metrics(self) -> dict[str, float]:
        return {"abl_isolated": float(len(self.isolated or []))}

    def state_dict(self) -> dict:
        return {"losses": self.losses, "isolated": self.isolated}

    def load_state_dict(self, state: dict) -> None:
        self.losses = dict(state.get("losses", {}))
        self.isolated = state.get("isolated")
