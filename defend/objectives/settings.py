"""The built-in objectives' settings (``objective.<name>.*``), apart from their torch-using classes: a
config names an objective, and reading its settings (``defend validate``, a typo'd key) imports this
file only, not the objective's module and torch behind it (``OBJECTIVES``' settings table)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class AblConfig:
    """Anti-backdoor learning (Li et al. 2021) as an objective: isolate, then unlearn."""

    isolation_steps: int = 50  # loss-guided split (LGA) until this step, then isolate
    isolation_ratio: float = 0.01  # the lowest-loss fraction of the samples seen while isolating
    gamma: float = 0.5  # LGA: samples whose loss is under gamma are pushed back up to it
    unlearn_batch_size: int = 8  # isolated samples per step whose loss is ascended after isolation
    unlearn_weight: float = 1.0
    max_unlearn_loss: float = 5.0  # ascent on a sample stops once its loss is above this (bounded)


@dataclass
class PcrConfig:
    """Patch-based cross-view regularization (docs/pcr.md has the formulas and the runs behind each default)."""

    patch_size: int = 16  # in pixels of the processed image
    fraction: float = 0.5  # of each image's patches perturbed in the second view
    mode: Literal["shuffle", "mask", "noise"] = "shuffle"
    noise_std: float = 1.0  # mode=noise: in the processor's normalised pixel units
    divergence: Literal["js", "sym_kl"] = "js"
    discrepancy_weight: float = 1.0  # of the bounded pull-apart term, in [0, weight]
    entropy_weight: float = 0.1
    # the perturbed view's entropy is raised up to this fraction of log(vocabulary), never beyond:
    # a uniform perturbed view would starve the label gate (docs/pcr.md)
    entropy_target: float = 0.5
    detach_original: bool = True  # the pull-apart moves only the perturbed view's output
    # task loss of each response token x (perturbed view's probability of the label) ** label_gate; 0: off
    label_gate: float = 1.0
    # a label ranked in the perturbed view's top k is not gated (0: off); protects weakly supported
    # clean answers from the gate's feedback loop (docs/pcr.md)
    label_gate_top_k: int = 5
