"""The ``results`` section: what the ``defense_results`` recipe runs (tasks, attacks, defenses, seeds,
families) and the goals its report ticks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ResultsGoals:
    """What a defense should reach on every attack; RESULTS.md ticks each one. Quality is the task's
    (vqa_accuracy for vqa, cider for caption)."""

    max_asr: float = 0.25
    # quality at most this far below the undefended model's on the same attack (absolute points)
    max_accuracy_drop: float | None = None
    # quality at least this fraction of the undefended model's on the same attack
    min_accuracy_ratio: float | None = None


@dataclass
class ResultsVictimGoals:
    """What every victim must show before its defense rows mean anything; RESULTS.md ticks each one."""

    min_asr: float = 0.9  # the undefended victim, on triggered inputs
    max_asr_clean: float = 0.05  # ... and on clean ones
    # the clean fine-tune's quality over the base's (absolute; 0.10 = ten points of vqa_accuracy): the
    # fine-tune teaches something new, so a defense that stops learning shows up as losing that gain
    min_clean_gain: float = 0.10


@dataclass
class StageOverrides:
    """Overrides of a results cell's stages on top of the attacks' and the demo's configs."""

    poison_overrides: list[str] = field(default_factory=list)  # e.g. [dataset.name=easy_vqa_scenes]
    finetune_overrides: list[str] = field(default_factory=list)
    evaluate_overrides: list[str] = field(default_factory=list)  # e.g. [eval.task=caption]


@dataclass
class ResultsTask(StageOverrides):
    """One task of the results: its stage overrides, and which attacks it runs (null: all)."""

    attacks: list[str] | None = None


@dataclass
class ResultsSubset:
    """``results.quick``: what the quick run keeps (one attack per trigger kind, one family)."""

    families: list[Literal["mllm", "mdlm"]] = field(default_factory=lambda: ["mllm"])
    attacks: list[str] = field(default_factory=lambda: ["badnets", "blended", "text"])
    tasks: list[str] = field(default_factory=lambda: ["vqa"])
    defenses: list[str] = field(default_factory=lambda: ["none", "pcr", "disp"])


def _default_goals() -> dict[str, ResultsGoals]:
    disp = ResultsGoals(max_asr=0.05, min_accuracy_ratio=0.95)  # the DiSP paper's claim
    return {"pcr": ResultsGoals(max_asr=0.25, max_accuracy_drop=0.05), "disp": disp, "disp+pcr": disp}


@dataclass
class ResultsConfig:
    """The ``defense_results`` recipe: every attack x defense x family on the demo's models."""

    families: list[Literal["mllm", "mdlm"]] = field(default_factory=lambda: ["mllm", "mdlm"])
    # attack name -> its poison config
    attacks: dict[str, str] = field(default_factory=lambda: {
        "badnets": "poison_badnets_easy_vqa", "blended": "poison_blended_easy_vqa", "sig": "poison_sig_easy_vqa",
        "wanet": "poison_wanet_easy_vqa", "trojvlm": "poison_trojvlm_easy_vqa"})
    # defense name -> overrides of the victim's fine-tune ("none": the undefended victim)
    defenses: dict[str, list[str]] = field(default_factory=lambda: {
        "none": [], "pcr": ["objective.name=pcr"], "abl": ["objective.name=abl"],
        "disp": [], "disp+pcr": ["objective.name=pcr"]})
    # defenses (those present in ``defenses``) that first purify the poisoned set with the undefended
    # victim (the ``disp`` recipe with config ``disp_config``), then fine-tune the base on the
    # purified set with their overrides
    purified: list[str] = field(default_factory=lambda: ["disp", "disp+pcr"])
    disp_config: str = "disp_demo"
    # defenses (present in ``defenses``) that fine-tune the undefended victim's adapter further, with their
    # overrides, on the first ``clean_rows`` rows of the unpoisoned training set (the defender's clean subset)
    from_victim: list[str] = field(default_factory=list)
    clean_rows: int = 500
    # task name -> its stage overrides (vqa: the attacks' configs as they are)
    tasks: dict[str, ResultsTask] = field(default_factory=lambda: {"vqa": ResultsTask()})
    # attack name -> overrides of its stages (after the task's): one poison config as several attacks,
    # e.g. badnets_refuse: {poison_overrides: [attack.target.type=refuse, ...], evaluate_overrides: [...]}
    attack_overrides: dict[str, StageOverrides] = field(default_factory=dict)
    # attack name -> the seeds it runs with (each its own poison draw and training); others: ``seed``
    seeds: dict[str, list[int]] = field(default_factory=dict)
    # rows every defense is read against, per task, family and attack (first seed): "base" (the
    # pre-trained base, not fine-tuned) and "clean" (fine-tuned on the unpoisoned training set)
    references: bool = True
    # overrides of every evaluation (e.g. a smaller test set)
    eval_overrides: list[str] = field(default_factory=list)
    docs_dir: str = "docs"  # RESULTS.md, results.json and the plot are written here
    # the pre-trained bases every cell trains on, kept with the report (defend/results/bases.py);
    # null: docs_dir/results_bases
    bases_dir: str | None = None
    # defense name -> what it should reach on every attack (defenses not named are reported, not
    # checked; names not in ``defenses`` are ignored)
    goals: dict[str, ResultsGoals] = field(default_factory=_default_goals)
    victim_goals: ResultsVictimGoals = field(default_factory=ResultsVictimGoals)
    # cells run at once, each in its own process (its log beside its folder) with cores // workers threads
    # (fewer if OMP_NUM_THREADS is lower). A tiny model's fine-tune runs 1.4x faster on two threads than on
    # one, so on a CPU box workers = cores runs the table fastest
    workers: int = 1
    # a quick run of ``quick_subset`` only (one seed), written into output_dir/quick, docs untouched
    quick: bool = False
    quick_subset: ResultsSubset = field(default_factory=ResultsSubset)
