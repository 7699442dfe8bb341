"""Data-poisoning attacks: image/prompt triggers x response targets, applied to a chosen subset."""
from defend.data.attacks.poisoning import PoisonPlan, plan_poison, poison_sample, trigger_sample
from defend.data.attacks.targets import apply_target, shows_target
from defend.data.attacks.triggers import build_trigger

__all__ = ["PoisonPlan", "apply_target", "build_trigger", "plan_poison", "poison_sample", "shows_target",
           "trigger_sample"]
