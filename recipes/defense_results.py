"""Every task x family x attack x seed x defense on the demo's tiny models, written to ``docs/RESULTS.md``.

    defend run defense_results --config defense_results
    defend run defense_results --config defense_results results.quick=true   # one attack per trigger kind

For each task in ``results.tasks`` (vqa; caption: easy_vqa_scenes captions, BLEU-4 and CIDEr) and each
family in ``results.families``: the demo's pre-trained base (cached, shared with the demo), then for each
attack in ``results.attacks`` (a poison config) and each of its seeds (``results.seeds``: the poison
draw and the training) every defense of ``results.defenses``:

- a plain defense overrides the victim's fine-tune (``objective.name=pcr``; ``none``: the victim itself):
  LoRA fine-tune on the poisoned set with the demo's victim recipe, then evaluate on the clean and
  triggered test sets (quality, ``asr``, ``asr_clean``, 95% intervals);
- ``results.purified`` (``disp``, ``disp+pcr``) run the ``disp`` chain: the undefended victim purifies
  the poisoned set, the base is fine-tuned on it with the defense's overrides, then evaluated;
- ``results.from_victim`` (e.g. ``clean_tune``) fine-tune the victim's adapter further on the first
  ``results.clean_rows`` unpoisoned training rows.

With ``results.references`` two more rows per task, family and attack (first seed): ``base`` (the base
evaluated as it is) and ``clean`` (fine-tuned on the unpoisoned training set); each defense row gets
``gain_kept`` from them (``defend/results/table.py``). Goals (``results.victim_goals``, ``results.goals``)
are ticked in the report.

Writes into ``results.docs_dir`` (generated, never edited by hand; ``results.quick``: into
``output_dir/quick`` instead): ``RESULTS.md``, ``results.json`` (one row per cell) and
``results_asr_vs_accuracy.png``. Every finished cell is kept in
``output_dir/<task>/<family>/<attack>/seed<k>/<defense>/cell.json``: a rerun with the same settings
reuses it, so an interrupted run continues where it stopped; ``results_cells.json`` beside the
report (the ledger, ``defend/results/ledger.py``) keeps every finished cell's metrics, and ``results_bases/``
the pre-trained bases they were made from (``defend/results/bases.py``), so a run spread over machines
that do not keep ``output_dir`` goes on from the committed ledger and bases. ``results.workers: N``
runs N cells at once, each in its own process (``defend/results/cells.py``: a cell waits for the cells
it starts from).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from defend.atomic import write_json, write_text
from defend.config import Config, ConfigError, load_config
from defend.models.answer_room import check_poisoned_room
from defend.results.bases import bases_dir, results_bases
from defend.results.cells import run_cells, victim_cells
from defend.results.ledger import LEDGER, Ledger, cell_keys, cells_to_run
from defend.results.plots import asr_accuracy_plot
from defend.results.stages import Stages, Victim, attack_facts, clean_dataset, poisoned_data
from defend.results.table import REFERENCES, add_gains, goal_checks, quality_metric, results_markdown
from defend.run_dir import start_run


def check_settings(cfg: Config) -> None:
    r = cfg.results
    if r.workers < 1:
        raise ConfigError(f"results.workers: {r.workers}; give the number of cells to run at once (1 or more).")
    if "none" not in r.defenses:
        raise ConfigError("results.defenses: include 'none: []' (the undefended victim every defense is compared with).")
    for name, kinds in (("results.purified", r.purified), ("results.from_victim", r.from_victim)):
        if "none" in kinds:
            raise ConfigError(f"{name}: 'none' is the undefended victim these defenses start from.")
    if both := set(r.purified) & set(r.from_victim):
        raise ConfigError(f"results.purified and results.from_victim both name {sorted(both)}; a defense is one kind.")
    if taken := set(r.defenses) & set(REFERENCES):
        raise ConfigError(f"results.defenses: {sorted(taken)} name the reference rows; rename the defense.")
    unknown = set(cfg.demo.finetune_overrides) - set(r.families)
    if unknown:
        raise ConfigError(f"demo.finetune_overrides: {sorted(unknown)} not in results.families {r.families}.")
    for name, named in (("results.seeds", r.seeds), ("results.attack_overrides", r.attack_overrides),
                        *((f"results.tasks.{t}.attacks", s.attacks or []) for t, s in r.tasks.items())):
        if unknown := set(named) - set(r.attacks):
            raise ConfigError(f"{name}: {sorted(unknown)} not in results.attacks {sorted(r.attacks)}.")
    check_stage_overrides(cfg)


def check_stage_overrides(cfg: Config) -> None:
    """Every override list the run will pass a stage reads as that stage's config, before any cell runs
    (a typo in one defense's overrides would otherwise stop the run hours in)."""
    r, stages = cfg.results, Stages(cfg)
    per_attack = {**{f"results.tasks.{t}": (s, s.attacks or list(r.attacks)) for t, s in r.tasks.items()},
                  **{f"results.attack_overrides.{a}": (s, [a]) for a, s in r.attack_overrides.items()}}
    lists = []
    for family in r.families:
        finetune, evaluate = stages.finetune_config(family), stages.evaluate_config(family)
        lists += [(f"demo.finetune_overrides.{family}", finetune, cfg.demo.finetune_overrides.get(family, [])),
                  ("results.eval_overrides", evaluate, r.eval_overrides)]
        lists += [(f"results.defenses.{d}", r.disp_config if d in r.purified else finetune, o) for d, o in r.defenses.items()]
        for where, (s, attacks) in per_attack.items():
            lists += [(f"{where}.poison_overrides", r.attacks[a], s.poison_overrides) for a in attacks]
            lists += [(f"{where}.finetune_overrides", finetune, s.finetune_overrides),
                      (f"{where}.evaluate_overrides", evaluate, s.evaluate_overrides)]
    seen = set()
    for where, config, overrides in lists:
        if (config, tuple(overrides)) in seen:  # the same list for both families, say
            continue
        seen.add((config, tuple(overrides)))
        try:
            load_config(config, overrides)
        except ConfigError as err:
            raise ConfigError(f"{where} (with config {config}): {err}") from None


def quick_view(cfg: Config) -> Config:
    """``results.quick``: the subset only, one seed, written into output_dir/quick."""
    r, q = cfg.results, cfg.results.quick_subset
    for name, wanted, have in (("attacks", q.attacks, r.attacks), ("tasks", q.tasks, r.tasks),
                               ("defenses", q.defenses, r.defenses)):
        if missing := [x for x in wanted if x not in have]:
            raise ConfigError(f"results.quick_subset.{name}: {missing} not in results.{name} {sorted(have)}.")
    tasks = {t: dataclasses.replace(r.tasks[t], attacks=[a for a in r.tasks[t].attacks or q.attacks if a in q.attacks])
             for t in q.tasks}
    results = dataclasses.replace(
        r, families=q.families, attacks={a: r.attacks[a] for a in q.attacks}, tasks=tasks,
        attack_overrides={a: o for a, o in r.attack_overrides.items() if a in q.attacks},
        defenses={d: r.defenses[d] for d in q.defenses}, seeds={}, docs_dir=str(Path(cfg.output_dir) / "quick"),
        bases_dir=str(bases_dir(cfg)))  # the full run's bases, so its finished cells are the quick run's too
    demo = dataclasses.replace(cfg.demo, finetune_overrides={f: o for f, o in cfg.demo.finetune_overrides.items()
                                                             if f in q.families})
    return dataclasses.replace(cfg, results=results, demo=demo)


def recipe_main(cfg: Config) -> list[dict]:
    cfg = quick_view(cfg) if cfg.results.quick else cfg
    check_settings(cfg)
    log = start_run(cfg, "defense_results")
    r = cfg.results
    out, docs = Path(cfg.output_dir), Path(r.docs_dir)
    started = time.perf_counter()
    bases = results_bases(cfg, out / "pretrain", log)  # kept beside the report, so the ledger holds on any machine
    cells, facts = [], {}  # every cell of the run, in the report's order; its attack's facts
    for task, settings in r.tasks.items():
        for attack in settings.attacks or r.attacks:
            poison_config, seeds = r.attacks[attack], r.seeds.get(attack, [cfg.seed])
            attack_poison = r.attack_overrides[attack].poison_overrides if attack in r.attack_overrides else []
            clean = clean_dataset(poison_config, settings.poison_overrides)  # the unpoisoned training set
            subset = clean_dataset(poison_config, settings.poison_overrides, r.clean_rows)  # the defender's clean rows
            for seed in seeds:
                poison = [*settings.poison_overrides, *attack_poison, f"attack.seed={seed}"]
                poison_dir = poisoned_data(poison_config, poison, out / "poison" / task / attack / f"seed{seed}", log)
                attack_said = attack_facts(poison_dir)
                for family in r.families:
                    v = Victim(task, family, bases[family], attack, seed, poison_dir)
                    facts[v] = attack_said
                    cells += victim_cells(cfg, v, out / task / family / attack / f"seed{seed}", clean, subset,
                                          seed == seeds[0], cells)
    stages = Stages(cfg)
    for v in facts:  # every attack's target fits in its evaluation's answers, before any cell trains
        check_poisoned_room(load_config(stages.evaluate_config(v.family), stages.evaluate(v)))
    # cells the ledger (docs_dir/results_cells.json, committed with the report) has from an earlier run
    ledger = Ledger(docs / LEDGER)
    keys = cell_keys(cfg, cells)
    run = {c.folder for c in cells_to_run(cells, keys, ledger)}
    known = {c.folder: ledger.metrics(keys[c.folder]) for c in cells if c.folder not in run}
    done = run_cells(cfg, cells, log, known=known,
                     on_done=lambda c, m: ledger.add(keys[c.folder], str(c.folder.relative_to(out)), m))
    ledger.keep(set(keys.values()))
    rows = []
    for cell in cells:
        v, metrics = cell.victim, done[cell.folder]
        rows.append({"task": v.task, "family": v.family, "attack": v.attack, "seed": v.seed, "defense": cell.defense,
                     **facts[v], **metrics})
        log.info("%s %s %s seed %d %s: %s", v.task, v.family, v.attack, v.seed, cell.defense,
                 {k: round(metrics[k], 3) for k in ("asr", "asr_clean", quality_metric(v.task))})
    add_gains(rows, r.victim_goals.min_clean_gain)
    checks = goal_checks(rows, cfg)
    report = results_markdown(rows, checks, cfg)
    log.info("%d cells in %.0f s", len(rows), time.perf_counter() - started)
    asr_accuracy_plot(rows, docs / "results_asr_vs_accuracy.png")
    write_json(docs / "results.json", [{k: v for k, v in row.items() if k != "seconds"} for row in rows])
    write_text(docs / "RESULTS.md", report)
    print("\n" + report)
    return rows


if __name__ == "__main__":
    from defend.runner import recipe_entry

    recipe_entry(recipe_main)
