"""Data-poisoning attacks: image/prompt triggers x response targets, applied to a chosen subset.

One file per attack (its settings' dataclass and its trigger); the table below says which module
registers each built-in one, so a config names an attack without importing every trigger."""
from defend.registry import Registry

ATTACKS = Registry("attack", "attack", {
    "badnets": "defend.data.attacks.badnets",
    "blended": "defend.data.attacks.blended",
    "sig": "defend.data.attacks.sig",
    "text": "defend.data.attacks.text",
    "trojvlm": "defend.data.attacks.trojvlm",
    "wanet": "defend.data.attacks.wanet",
})

_LAZY = {"PoisonPlan": "poisoning", "plan_poison": "poisoning", "poison_sample": "poisoning",
         "trigger_sample": "poisoning", "apply_target": "targets", "shows_target": "targets",
         "build_trigger": "trigger", "Trigger": "trigger"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"defend.data.attacks.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'defend.data.attacks' has no attribute {name!r}")


__all__ = ["ATTACKS", "PoisonPlan", "Trigger", "apply_target", "build_trigger", "plan_poison", "poison_sample",
           "shows_target", "trigger_sample"]
