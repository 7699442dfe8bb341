"""What one ``defense_results`` cell runs: each a chain of ordinary recipe runs, keyed on the settings
those recipes read (defend/stage_cache.py: the keys each recipe reads, the data and adapters they name
by content), so a rerun reuses finished cells and an edited YAML reruns exactly the cells that read it."""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from defend.config import Config, load_config
from defend.data.manifest import verify_data_folder
from defend.metrics.intervals import PROPORTIONS
from defend.runner import run_recipe
from defend.stage_cache import read_settings, run_once, settings_key, stage_settings

# what a cell keeps of an evaluate run's metrics (those present), with the 95% intervals of the proportions
KEPT = ("asr", "asr_clean", "vqa_accuracy", "bleu4", "cider", *(f"{m}_{end}" for m in PROPORTIONS for end in ("low", "high")),
        "n", "n_triggered", "n_clean")


@dataclass(frozen=True)
class Victim:
    """Where a cell's model and data come from: one task, family, attack and seed."""

    task: str
    family: str
    base: Path
    attack: str
    seed: int
    poison_dir: str

    def common(self) -> list[str]:
        return [f"seed={self.seed}", f"model.family={self.family}", f"model.path={self.base}"]


def poisoned_data(config: str, overrides: list[str], out: Path, log) -> str:
    """The poison recipe's data folder for ``config`` + ``overrides``, made once per the settings it reads."""
    def work(folder: Path) -> dict:
        return run_recipe("poison", config, [*overrides, f"output_dir={folder}"])

    made = run_once(out, stage_settings("poison", config, overrides), work, log)
    verify_data_folder(Path(made["data_dir"]), f"{config} (its poisoned data)")  # every cell trusts it
    return made["data_dir"]


def clean_dataset(config: str, overrides: list[str], rows: int | None = None) -> list[str]:
    """Overrides naming the unpoisoned training set a poison config reads (its first ``rows`` rows)."""
    d = load_config(config, overrides).dataset
    keep = {k: v for k, v in dataclasses.asdict(d).items() if v is not None and k != "test_path"}
    if rows is not None:
        keep["max_samples"] = min(rows, d.max_samples or rows)
    return [f"dataset.{k}={v}" for k, v in keep.items()]


def attack_facts(poison_dir: str) -> dict:
    """What a row says about its attack, from the poison recipe's manifest."""
    attack = json.loads((Path(poison_dir) / "manifest.json").read_text())["attack"]
    return {"trigger": attack["name"], "poison_ratio": attack["poison_ratio"], "target_type": attack["target"]["type"]}


def timed_metrics(work: Callable[[Path], dict]) -> Callable[[Path], dict]:
    """``work`` returning an evaluate run's metrics -> the row a results cell keeps: the metrics, their
    95% intervals and counts (``n`` clean questions; ``n_triggered``, ``n_clean``: the ASR counts), seconds."""
    def timed(folder: Path) -> dict:
        started = time.perf_counter()
        metrics = work(folder)
        return {k: metrics[k] for k in KEPT if k in metrics} | {"seconds": round(time.perf_counter() - started, 1)}
    return timed


class Stages:
    """The stage configs and overrides of one results run (``cfg.demo``'s victim recipe, ``cfg.results``)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def overrides(self, v: Victim, stage: str) -> list[str]:
        """``<stage>_overrides`` of the victim's task, then of its attack."""
        r = self.cfg.results
        attack = r.attack_overrides.get(v.attack)
        return [*getattr(r.tasks[v.task], stage), *(getattr(attack, stage) if attack else [])]

    def finetune_config(self, family: str) -> str:
        return self.cfg.demo.finetune_config.format(family=family)

    def evaluate_config(self, family: str) -> str:
        return self.cfg.demo.evaluate_config.format(family=family)

    def finetune(self, v: Victim, data: list[str], extra: list[str]) -> list[str]:
        return [*v.common(), *self.cfg.demo.finetune_overrides.get(v.family, []), *self.overrides(v, "finetune_overrides"),
                *data, *extra]

    def evaluate(self, v: Victim) -> list[str]:
        return [*v.common(), f"eval.poison_dir={v.poison_dir}", *self.overrides(v, "evaluate_overrides"),
                *self.cfg.results.eval_overrides]

    def poisoned_train(self, v: Victim) -> list[str]:
        return ["dataset.name=jsonl", f"dataset.path={v.poison_dir}/train.jsonl"]

    def train_then_evaluate(self, v: Victim, finetune: list[str], evaluate: list[str]) -> Callable[[Path], dict]:
        def work(folder: Path) -> dict:
            trained = run_recipe("finetune", self.finetune_config(v.family), [*finetune, f"output_dir={folder / 'finetune'}"])
            return run_recipe("evaluate", self.evaluate_config(v.family),
                              [*evaluate, f"model.adapter={trained['saved']}", f"output_dir={folder / 'evaluate'}"])
        return work

    def victim_cell(self, folder: Path, v: Victim, defense: list[str], log) -> dict:
        """Fine-tune on the poisoned set with the defense's overrides (none: the victim), then evaluate."""
        finetune = self.finetune(v, self.poisoned_train(v), defense)
        evaluate = self.evaluate(v)
        settings = {"finetune": stage_settings("finetune", self.finetune_config(v.family), finetune),
                    "evaluate": stage_settings("evaluate", self.evaluate_config(v.family), evaluate)}
        return run_once(folder, settings, timed_metrics(self.train_then_evaluate(v, finetune, evaluate)), log)

    def from_victim_cell(self, folder: Path, v: Victim, victim: Path, clean: list[str], defense: list[str], log) -> dict:
        """The undefended victim's adapter fine-tuned further on clean rows (``clean``: their dataset
        overrides) with the defense's overrides, then evaluated."""
        adapter = victim / "finetune" / "adapter"
        finetune = self.finetune(v, clean, [*defense, f"model.adapter={adapter}"])
        evaluate = self.evaluate(v)
        settings = {"finetune": stage_settings("finetune", self.finetune_config(v.family), finetune),
                    "evaluate": stage_settings("evaluate", self.evaluate_config(v.family), evaluate)}
        return run_once(folder, settings, timed_metrics(self.train_then_evaluate(v, finetune, evaluate)), log)

    def purified_cell(self, folder: Path, v: Victim, victim: Path, defense: list[str], log) -> dict:
        """The ``disp`` chain: purify the poisoned set with the victim, fine-tune the base on it (with the
        defense's overrides), evaluate. Defenses of one victim share its purification."""
        r = self.cfg.results
        chain = [*v.common(), f"model.adapter={victim / 'finetune' / 'adapter'}", *self.poisoned_train(v),
                 f"eval.poison_dir={v.poison_dir}", f"disp.finetune_config={self.finetune_config(v.family)}",
                 f"disp.evaluate_config={self.evaluate_config(v.family)}",
                 f"disp.finetune_overrides={json.dumps([*self.cfg.demo.finetune_overrides.get(v.family, []), *self.overrides(v, 'finetune_overrides')])}",
                 f"disp.evaluate_overrides={json.dumps([*self.overrides(v, 'evaluate_overrides'), *r.eval_overrides])}",
                 *self.overrides(v, "evaluate_overrides"), *defense]  # purification generates as evaluation does
        chain_cfg = load_config(r.disp_config, chain)
        settings = {"disp": read_settings("disp", chain_cfg)}
        # the victim's purification, shared by the defenses whose purify settings match (a folder per settings:
        # it goes with the victim when that is retrained, and a purify folder refuses other settings)
        shared = victim / f"purified-{settings_key(read_settings('purify', chain_cfg))}"

        def work(folder: Path) -> dict:
            return run_recipe("disp", r.disp_config, [*chain, f"disp.purify_dir={shared}", f"output_dir={folder}"])["evaluate"]

        return run_once(folder, settings, timed_metrics(work), log)

    def base_cell(self, folder: Path, v: Victim, log) -> dict:
        """The pre-trained base, not fine-tuned, on the attack's test sets."""
        evaluate = self.evaluate(v)
        settings = {"evaluate": stage_settings("evaluate", self.evaluate_config(v.family), evaluate)}

        def work(folder: Path) -> dict:
            return run_recipe("evaluate", self.evaluate_config(v.family), [*evaluate, f"output_dir={folder / 'evaluate'}"])

        return run_once(folder, settings, timed_metrics(work), log)

    def clean_cell(self, folder: Path, v: Victim, shared: Path, clean: list[str], log) -> dict:
        """The fine-tune on the unpoisoned training set (``clean``: its dataset overrides), on the attack's
        test sets. Trained once per settings into ``shared-<hash>``: attacks whose overrides leave the
        fine-tune alike share it."""
        finetune = self.finetune(v, clean, [])
        settings = {"finetune": stage_settings("finetune", self.finetune_config(v.family), finetune)}
        trained = shared.with_name(f"{shared.name}-{settings_key(settings)}")

        def train(out: Path) -> dict:
            run_recipe("finetune", self.finetune_config(v.family), [*finetune, f"output_dir={out / 'finetune'}"])
            return {}

        run_once(trained, settings, train, log)
        evaluate = [*self.evaluate(v), f"model.adapter={trained / 'finetune' / 'adapter'}"]
        settings = {"evaluate": stage_settings("evaluate", self.evaluate_config(v.family), evaluate)}

        def work(folder: Path) -> dict:
            return run_recipe("evaluate", self.evaluate_config(v.family), [*evaluate, f"output_dir={folder / 'evaluate'}"])

        return run_once(folder, settings, timed_metrics(work), log)
