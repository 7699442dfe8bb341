"""Training objectives that wrap the task loss: registry, the stack a recipe calls, and the defenses."""
from defend.objectives import abl, pcr  # noqa: F401  (register the built-in objectives)
from defend.objectives.base import OBJECTIVES, Objective, TrainingContext, objective_names, register
from defend.objectives.stack import TrainingObjective

__all__ = ["OBJECTIVES", "Objective", "TrainingContext", "TrainingObjective", "objective_names", "register"]
