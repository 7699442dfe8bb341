"""The objective interface and its registry.

An objective wraps the family's task loss. It may (1) add views of every row to the batch, which
then goes through the model in one forward (PCR's perturbed images), (2) scale the task loss of each row or token (ABL's loss-guided split, PCR's label gate), and (3) add named terms computed from the forward's
scores. ``TrainingObjective`` (``stack.py``) runs a list of them; a new one is one file: its settings'
dataclass and its class, registered with ``@register("name", config=ItsConfig)``; the settings are then
``objective.<name>.*``, checked when the config loads (docs/extending.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from defend.config import Config, ConfigError
from defend.models.scoring import ResponseScores
from defend.objectives import OBJECTIVES


@dataclass
class TrainingContext:
    """What an objective may use besides the batch: the model wrapper, the run's samples and collator."""

    cfg: Config
    vlm: Any  # VisionLanguageModel
    samples: list
    collate: Callable


class Objective:
    name: ClassVar[str] = ""
    views: ClassVar[int] = 1  # image views of each row in the forward (the original is view 0)

    def __init__(self, ctx: TrainingContext):
        self.ctx = ctx
        self.generators: dict[str, torch.Generator] = {}  # saved and restored with checkpoints

    def add_views(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch with ``views`` stacked copies of its rows (only for ``views > 1``)."""
        return batch

    def loss_scale(self, scores: ResponseScores, batch: dict[str, Any], step: int) -> torch.Tensor | None:
        """A factor on the task loss of each row, (n, 1), or of each token, (n, L); None: no change."""
        return None

    def terms(self, scores: ResponseScores, batch: dict[str, Any], step: int, model) -> dict[str, torch.Tensor]:
        """Named loss terms added to the total (each logged)."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging that are not loss terms."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def register(name: str, *, config: type | None = None):
    """Register an objective class as ``name``, its settings (``objective.<name>.*``) read into ``config``."""
    def add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        return OBJECTIVES.register(name, config=config)(cls)

    return add


def objective_class(name: str) -> type[Objective]:
    return OBJECTIVES.get(name).impl


def objective_names(cfg: Config) -> list[str]:
    """``objective.name`` as a list, checked: known names, each once, "none" alone."""
    names = [cfg.objective.name] if isinstance(cfg.objective.name, str) else list(cfg.objective.name)
    names = [n for n in names if n != "none"]
    for n in names:
        if n not in OBJECTIVES:
            raise ConfigError(f"objective.name: {OBJECTIVES.unknown(n)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"objective.name: {names} names an objective twice.")
    if sum(objective_class(n).views > 1 for n in names) > 1:
        raise ConfigError(f"objective.name: {names}: only one objective may add views of the images.")
    return names
