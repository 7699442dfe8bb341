"""Every attack x defense x model family on the demo's tiny models, written to ``docs/RESULTS.md``.

    defend run defense_results --config defense_results

For each family in ``results.families``: the demo's pre-trained base (cached, shared with the demo),
then for each attack in ``results.attacks`` (a poison config, 10% of the easy-vqa training set) and
each defense in ``results.defenses`` (overrides of the victim's fine-tune, e.g.
``objective.name=pcr``): LoRA fine-tune on the poisoned set with the demo's victim recipe
(``demo.finetune_config`` + ``demo.finetune_overrides``), then evaluate on the clean and the
triggered test sets (``vqa_accuracy``, ``asr``, ``asr_clean``). The defenses in
``results.purified`` (``disp``, ``disp+pcr``) run the ``disp`` chain instead: the undefended victim
(defense ``none``) purifies the poisoned set, the base is fine-tuned on the purified set with the
defense's overrides, then evaluated the same way.

Writes into ``results.docs_dir`` (generated, never edited by hand): ``RESULTS.md`` (a table per family,
each defense of ``results.goals`` checked against its goals), ``results.json`` (one row per
family, attack and defense) and ``results_asr_vs_accuracy.png``. Every finished cell is kept in
``output_dir/<family>/<attack>/<defense>/cell.json``: a rerun with the same settings reuses it, so an
interrupted run continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from datetime import date
from pathlib import Path

from defend.atomic import write_json, write_text
from defend.cells import run_cell
from defend.cli import run_recipe
from defend.config import Config, ConfigError, load_config
from defend.data.manifest import verify_data_folder
from defend.metrics.intervals import with_interval
from defend.pretrained import pretrained_bases
from defend.report import asr_accuracy_plot
from defend.run_dir import start_run

METRICS = ("asr", "asr_clean", "vqa_accuracy")


def check_settings(cfg: Config) -> None:
    r = cfg.results
    if "none" not in r.defenses:
        raise ConfigError("results.defenses: include 'none: []' (the undefended victim every defense is compared with).")
    if "none" in r.purified:
        raise ConfigError("results.purified: 'none' is the undefended victim the purified defenses start from.")
    unknown = set(cfg.demo.finetune_overrides) - set(r.families)
    if unknown:
        raise ConfigError(f"demo.finetune_overrides: {sorted(unknown)} not in results.families {r.families}.")


def poisoned_data(config: str, out: Path) -> str:
    """The poison recipe's data folder for ``config``: reused when its manifest has the same attack and data."""
    wanted = load_config(config)
    manifest = out / "data" / "manifest.json"
    if manifest.is_file():
        made = json.loads(manifest.read_text())
        if made["attack"] == dataclasses.asdict(wanted.attack) and made["dataset"] == dataclasses.asdict(wanted.dataset):
            verify_data_folder(out / "data", f"{config} (its poisoned data, reused)")  # every cell trusts it
            return str(out / "data")
    return run_recipe("poison", config, [f"output_dir={out}"])["data_dir"]


KEPT = (*METRICS, *(f"{m}_{end}" for m in METRICS for end in ("low", "high")), "n", "n_triggered", "n_clean")


def timed_metrics(work):
    """``work`` returning an evaluate run's metrics -> the row a results cell keeps: the metrics, their
    95% intervals and counts (``n`` clean questions; ``n_triggered``, ``n_clean``: the ASR counts), seconds."""
    def timed(folder: Path) -> dict:
        started = time.perf_counter()
        metrics = work(folder)
        return {k: metrics[k] for k in KEPT} | {"seconds": round(time.perf_counter() - started, 1)}
    return timed


def attack_facts(poison_dir: str) -> dict:
    """What a row says about its attack, from the poison recipe's manifest."""
    attack = json.loads((Path(poison_dir) / "manifest.json").read_text())["attack"]
    return {"poison_ratio": attack["poison_ratio"], "target_type": attack["target"]["type"]}


def data_hash(poison_dir: str) -> str:
    files = json.loads((Path(poison_dir) / "manifest.json").read_text())["files"]  # every file's sha256, images too
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def resolved(config: str, overrides: list[str]) -> dict:
    """A stage's settings as a cell keys them: the config file's contents with the overrides applied, so
    editing the YAML (not only the overrides) makes the cell run again."""
    return dataclasses.asdict(load_config(config, overrides))


def victim_cell(cfg: Config, folder: Path, family: str, base: Path, poison_dir: str, defense: list[str], log) -> dict:
    """Fine-tune on the poisoned set with the defense's overrides (none: the victim), then evaluate."""
    common = [f"seed={cfg.seed}", f"model.family={family}", f"model.path={base}"]
    finetune_config, evaluate_config = (c.format(family=family) for c in (cfg.demo.finetune_config, cfg.demo.evaluate_config))
    finetune = [*common, *cfg.demo.finetune_overrides.get(family, []), "dataset.name=jsonl",
                f"dataset.path={poison_dir}/train.jsonl", *defense]
    evaluate = [*common, f"eval.poison_dir={poison_dir}", *cfg.results.eval_overrides]
    settings = {"finetune": resolved(finetune_config, finetune), "evaluate": resolved(evaluate_config, evaluate),
                "poisoned_data": data_hash(poison_dir)}

    def work(folder: Path) -> dict:
        trained = run_recipe("finetune", finetune_config, [*finetune, f"output_dir={folder / 'finetune'}"])
        return run_recipe("evaluate", evaluate_config,
                          [*evaluate, f"model.adapter={trained['saved']}", f"output_dir={folder / 'evaluate'}"])

    return run_cell(folder, settings, timed_metrics(work), log)


def purified_cell(cfg: Config, folder: Path, family: str, base: Path, poison_dir: str, victim: Path,
                  defense: list[str], log) -> dict:
    """The ``disp`` chain: purify the poisoned set with the victim, fine-tune the base on it (with the
    defense's overrides), evaluate. Defenses of one victim share its purification."""
    chain = [f"seed={cfg.seed}", f"model.family={family}", f"model.path={base}",
             f"model.adapter={victim / 'finetune' / 'adapter'}", "dataset.name=jsonl",
             f"dataset.path={poison_dir}/train.jsonl", f"eval.poison_dir={poison_dir}",
             f"disp.finetune_config={cfg.demo.finetune_config.format(family=family)}",
             f"disp.evaluate_config={cfg.demo.evaluate_config.format(family=family)}",
             f"disp.finetune_overrides={json.dumps(cfg.demo.finetune_overrides.get(family, []))}",
             f"disp.evaluate_overrides={json.dumps(cfg.results.eval_overrides)}", *defense]
    victim_settings = json.loads((victim / "cell.json").read_text())["settings"]
    settings = {"disp": resolved(cfg.results.disp_config, chain), "victim": victim_settings}
    # the victim's purification, shared by the defenses whose purify settings match (a folder per settings:
    # it goes with the victim when that is retrained, and a purify folder refuses other settings)
    purify = {k: settings["disp"][k] for k in ("dataset", "purify", "diffusion", "eval")}
    shared = victim / f"purified-{hashlib.sha256(json.dumps(purify, sort_keys=True).encode()).hexdigest()[:12]}"

    def work(folder: Path) -> dict:
        return run_recipe("disp", cfg.results.disp_config,
                          [*chain, f"disp.purify_dir={shared}", f"output_dir={folder}"])["evaluate"]

    return run_cell(folder, settings, timed_metrics(work), log)


def implanted(undefended: dict) -> bool:
    """Whether the attack worked on the undefended victim (otherwise a defense has nothing to remove)."""
    return undefended["asr"] >= 0.5


def goal_checks(rows: list[dict], cfg: Config) -> list[tuple[str, bool]]:
    undefended = {(r["family"], r["attack"]): r for r in rows if r["defense"] == "none"}
    checks = []
    for r in rows:
        goals = cfg.results.goals.get(r["defense"])
        if goals is None:
            continue
        base = undefended[(r["family"], r["attack"])]
        where = f"{r['family']} {r['attack']} {r['defense']}"
        vacuous = f" (vacuous: the attack did not implant, undefended asr {base['asr']:.3f})" if not implanted(base) else ""
        checks.append((f"{where}: asr {r['asr']:.3f} <= {goals.max_asr}{vacuous}", r["asr"] <= goals.max_asr))
        if goals.max_accuracy_drop is not None:
            drop = base["vqa_accuracy"] - r["vqa_accuracy"]
            checks.append((f"{where}: vqa_accuracy {drop:+.3f} below undefended, within {goals.max_accuracy_drop}",
                           drop <= goals.max_accuracy_drop))
        if goals.min_accuracy_ratio is not None:
            ratio = r["vqa_accuracy"] / base["vqa_accuracy"] if base["vqa_accuracy"] else 0.0
            checks.append((f"{where}: vqa_accuracy {ratio:.3f} of undefended, at least {goals.min_accuracy_ratio}",
                           ratio >= goals.min_accuracy_ratio))
    return checks


def results_markdown(rows: list[dict], checks: list[tuple[str, bool]], cfg: Config) -> str:
    n_clean = rows[0]["n"] if rows else 0
    lines = ["# Defense results", "",
             f"Generated by the `defense_results` recipe (`make results`) on {date.today()}; do not edit by"
             " hand (rerun the recipe: finished cells are reused).", "",
             f"Victims: the demo's pre-trained tiny bases, LoRA-fine-tuned with `{cfg.demo.finetune_config}` on"
             " easy-vqa with 10% of the training set poisoned; pcr and abl change the fine-tune's objective, disp"
             " fine-tunes the base on the set purified by the victim (disp+pcr: with PCR as the objective)."
             f" Evaluation: {n_clean} clean test questions (`vqa_accuracy`, `asr_clean`) and the triggered copies"
             " (`asr`); every value with its 95% Wilson interval. Rows also in `results.json`.", "",
             "![ASR against clean accuracy](results_asr_vs_accuracy.png)", ""]
    undefended = {(r["family"], r["attack"]): r for r in rows if r["defense"] == "none"}
    for family in dict.fromkeys(r["family"] for r in rows):
        lines += [f"## {family}", "", "| attack | defense | asr | asr_clean | vqa_accuracy | vs. undefended |",
                  "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["family"] == family):
            delta = r["vqa_accuracy"] - undefended[(family, r["attack"])]["vqa_accuracy"]
            note = f"{delta:+.3f}" if r["defense"] != "none" else ("" if implanted(r) else "attack did not implant")
            lines.append(f"| {r['attack']} | {r['defense']} | {with_interval(r, 'asr')} | {with_interval(r, 'asr_clean')} |"
                         f" {with_interval(r, 'vqa_accuracy')} | {note} |")
        lines.append("")
    lines += ["## Goals", "", *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks), ""]
    return "\n".join(lines)


def recipe_main(cfg: Config) -> list[dict]:
    check_settings(cfg)
    log = start_run(cfg, "defense_results")
    out, docs = Path(cfg.output_dir), Path(cfg.results.docs_dir)
    started = time.perf_counter()
    poison_dirs = {attack: poisoned_data(config, out / "poison" / attack) for attack, config in cfg.results.attacks.items()}
    bases, _ = pretrained_bases(cfg, out / "pretrain", log, families=cfg.results.families)
    task = load_config(cfg.demo.evaluate_config.format(family=cfg.results.families[0])).eval.task
    rows = []
    for family in cfg.results.families:
        for attack, poison_dir in poison_dirs.items():
            cells = out / family / attack
            order = ["none", *(d for d in cfg.results.defenses if d != "none")]  # the victim first
            for defense in order:
                overrides = cfg.results.defenses[defense]
                if defense in cfg.results.purified:
                    metrics = purified_cell(cfg, cells / defense, family, bases[family], poison_dir, cells / "none",
                                            overrides, log)
                else:
                    metrics = victim_cell(cfg, cells / defense, family, bases[family], poison_dir, overrides, log)
                rows.append({"family": family, "attack": attack, "defense": defense, "task": task, "seed": cfg.seed,
                             **attack_facts(poison_dir), **metrics})
                log.info("%s %s %s: %s", family, attack, defense, {k: round(metrics[k], 3) for k in METRICS})
    checks = goal_checks(rows, cfg)
    report = results_markdown(rows, checks, cfg)
    log.info("%d cells in %.0f s", len(rows), time.perf_counter() - started)
    asr_accuracy_plot(rows, docs / "results_asr_vs_accuracy.png")
    write_json(docs / "results.json", [{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    write_text(docs / "RESULTS.md", report)
    print("\n" + report)
    return rows


if __name__ == "__main__":
    from defend.cli import recipe_entry

    recipe_entry(recipe_main)
