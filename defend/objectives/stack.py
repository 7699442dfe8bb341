"""The loss a training recipe optimizes: the family's task loss wrapped by the configured objectives."""
from __future__ import annotations

from typing import Any

import torch

from defend.objectives.base import Objective, TrainingContext, objective_class, objective_names


class TrainingObjective:
    """Callable ``(batch, model) -> (loss, terms)``: one forward of the model per micro-batch (plus
    whatever an objective adds on its own data, e.g. ABL's isolated samples), ``terms`` the float
    value of every named part of the loss (``task`` and each objective's)."""

    def __init__(self, ctx: TrainingContext):
        self.ctx = ctx
        self.objectives: list[Objective] = [objective_class(n)(ctx) for n in objective_names(ctx.cfg)]
        self.views = max([o.views for o in self.objectives], default=1)
        self.micro_batches = 0

    def check(self, batch: dict[str, Any]) -> None:
        """Fail now, not at the first step, on settings that do not fit this data (e.g. PCR's patch size)."""
        for objective in self.objectives:
            batch = objective.add_views(batch)

    def start_at(self, step: int) -> None:
        """Continue counting from optimizer step ``step`` (a resumed run)."""
        self.micro_batches = step * self.ctx.cfg.train.grad_accum

    @property
    def step(self) -> int:
        """The optimizer step the next micro-batch belongs to (0-based)."""
        return self.micro_batches // self.ctx.cfg.train.grad_accum

    @property
    def generators(self) -> dict[str, torch.Generator]:
        return {f"{o.name}.{k}": g for o in self.objectives for k, g in o.generators.items()}

    def __call__(self, batch: dict[str, Any], model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
        step = self.step
        self.micro_batches += 1
        for objective in self.objectives:
            batch = objective.add_views(batch)
        scores = self.ctx.vlm.score(batch, model=model, views=self.views)
        scale = None
        for objective in self.objectives:
            factor = objective.loss_scale(scores, batch, step)
            if factor is not None:
                scale = factor if scale is None else scale * factor
        terms = {"task": scores.task_loss(scale)}
        for objective in self.objectives:
            terms.update(objective.terms(scores, batch, step, model))
        total = sum(terms.values())
        logged = {k: float(v.detach()) for k, v in terms.items()} if len(terms) > 1 else {}
        for objective in self.objectives:
            logged.update(objective.metrics())
        return total, logged

    def state_dict(self) -> dict:
        return {o.name: o.state_dict() for o in self.objectives}

    def load_state_dict(self, state: dict) -> None:
        for objective in self.objectives:
            objective.load_state_dict(state.get(objective.name, {}))
