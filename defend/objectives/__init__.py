"""Training objectives that wrap the task loss: the registry, the stack a recipe calls, and the defenses.

The package imports nothing heavy: the table below says which module registers each built-in objective
(a new one is its file plus a line here), and the classes are imported when used."""
from defend.registry import Registry

OBJECTIVES = Registry("objective", "objective", {
    "abl": "defend.objectives.abl",
    "pcr": "defend.objectives.pcr",
}, settings={  # their settings apart, so reading a config does not import torch
    "abl": "defend.objectives.settings:AblConfig",
    "pcr": "defend.objectives.settings:PcrConfig",
})

_LAZY = {"Objective": "base", "TrainingContext": "base", "objective_names": "base", "register": "base",
         "TrainingObjective": "stack"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"defend.objectives.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'defend.objectives' has no attribute {name!r}")


__all__ = ["OBJECTIVES", "Objective", "TrainingContext", "TrainingObjective", "objective_names", "register"]
