"""The sections of the recipes that chain other recipes: ``demo``, ``disp`` and ``disp_sweep``
(``defense_results``' section is defend/results/config.py). Each names the configs of the stages it
runs and the overrides it passes them; defend/config.py composes them into the schema."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DemoGoals:
    """What the demo expects; results.md ticks each one."""

    min_vqa_accuracy: float = 0.85  # clean fine-tune, easy-vqa test
    min_asr: float = 0.9  # backdoored fine-tune on triggered inputs
    max_asr_clean: float = 0.05  # backdoored on clean inputs; also the clean model's asr
    max_accuracy_drop: float = 0.05  # backdoored vs clean fine-tune vqa_accuracy


@dataclass
class DemoConfig:
    """The demo recipe's stages. Each runs with ``model.family`` set; a ``{family}`` in a config name
    is filled in (for per-family stage configs)."""

    families: list[Literal["mllm", "mdlm"]] = field(default_factory=lambda: ["mllm", "mdlm"])
    # one vision encoder for all families (pretrain_vision recipe); null: none
    vision_config: str | None = "demo_pretrain_vision"
    # finetune stages of each family's base, in order; the first starts from its own model.path
    # with the vision encoder above, each next one from the previous one's model
    pretrain_configs: list[str] = field(default_factory=lambda: ["demo_pretrain_vqa"])
    finetune_config: str = "demo_finetune"
    # per family, overrides of the fine-tunes (clean and poisoned alike), e.g. {mdlm: [train.max_steps=500]}
    finetune_overrides: dict[str, list[str]] = field(default_factory=dict)
    evaluate_config: str = "demo_evaluate"
    # the attack of the backdoored fine-tune (a poison config); null: clean models only
    poison_config: str | None = "poison_badnets_easy_vqa"
    poison_overrides: list[str] = field(default_factory=list)  # of the poison run, e.g. [attack.poison_ratio=0.1]
    goals: DemoGoals = field(default_factory=DemoGoals)
    reuse_pretrained: bool = True  # reuse a cached base pre-trained with the same settings


@dataclass
class DispConfig:
    """The ``disp`` recipe: purify (with this config) -> fine-tune on the purified set -> evaluate.

    The later stages are ordinary recipe runs with their own configs; the chain passes them the
    model (family, path), ``seed``, the data and this config's ``objective`` section."""

    finetune_config: str = "finetune_tiny_mllm"
    evaluate_config: str = "evaluate_tiny_mllm"
    finetune_overrides: list[str] = field(default_factory=list)
    evaluate_overrides: list[str] = field(default_factory=list)
    # where the purification's shards and data go (null: output_dir/purify); chains with the same
    # purify settings can share one folder and purify once
    purify_dir: str | None = None
    # purify -> fine-tune this many times, each round purifying with the previous round's recovered
    # model (1: the paper's DiSP)
    rounds: int = 1


@dataclass
class SweepConfig:
    """The ``disp_sweep`` recipe: DiSP's masked inference on one model at every mask ratio x selection."""

    mask_ratios: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.45, 0.6, 0.7])
    selections: list[Literal["saliency", "attention", "random"]] = field(
        default_factory=lambda: ["saliency", "random", "attention"])
    evaluate_config: str = "evaluate_tiny_mllm"
    evaluate_overrides: list[str] = field(default_factory=list)
