import dataclasses
import json
import shutil
import statistics

import pytest
import yaml

from defend.atomic import write_json
from defend.config import ConfigError, load_config
from defend.metrics.intervals import wilson
from defend.pretrained import base_recipe_key
from defend.results.config import ResultsSubset
from recipes.defense_results import recipe_main
from tests.recipes.test_demo import write_stage_configs


def test_results_cover_every_attack_and_defense_and_a_rerun_reuses_finished_cells(make_cfg, tmp_path):
    stages = write_stage_configs(tmp_path)
    poison = next(s.split("=", 1)[1] for s in stages if s.startswith("demo.poison_config="))
    (tmp_path / "poison_sig.yaml").write_text(
        (tmp_path / "poison_mllm.yaml").read_text().replace("name: badnets", "name: sig"))
    docs = tmp_path / "docs"
    (tmp_path / "disp_mllm.yaml").write_text(yaml.safe_dump({
        "dataset": {"name": "jsonl", "max_samples": 12},
        "purify": {"mask_ratio": 0.5, "block_size": 4, "batch_size": 4, "actors": 1},
        "eval": {"max_new_tokens": 2}, "train": {"max_length": 64}, "disp": {"rounds": 2}}))
    # seed 1: its own cached base, so the demo's test still sees a cold cache for seed 0
    cfg = make_cfg("mllm", *stages, "seed=1", "results.families=[mllm]",
                   f"results.attacks={{badnets: {poison}, sig: {tmp_path / 'poison_sig.yaml'}}}",
                   "results.defenses={none: [], pcr: [objective.name=pcr, objective.pcr.patch_size=16],"
                   " abl: [objective.name=abl, objective.abl.isolation_steps=1], disp: []}",
                   f"results.disp_config={tmp_path / 'disp_mllm.yaml'}",
                   "results.eval_overrides=[eval.max_samples=4]", f"results.docs_dir={docs}")
    rows = recipe_main(cfg)
    saved = json.loads((docs / "results.json").read_text())
    defenses = ("base", "clean", "none", "pcr", "abl", "disp")
    assert [(r["attack"], r["seed"], r["defense"]) for r in saved] == [(a, 1, d) for a in ("badnets", "sig") for d in defenses]
    intervals = {f"{m}_{end}" for m in ("asr", "asr_clean", "vqa_accuracy") for end in ("low", "high")}
    run = tmp_path / "run" / "vqa" / "mllm"
    for row in saved:
        gain = set() if row["defense"] in ("base", "clean") else {"gain_kept"}
        assert set(row) == {"family", "attack", "defense", "task", "seed", "trigger", "poison_ratio", "target_type", "asr",
                            "asr_clean", "vqa_accuracy", "n", "n_triggered", "n_clean", *intervals, *gain}
        assert (row["task"], row["trigger"], row["poison_ratio"], row["target_type"], row["n"]) == (
            "vqa", row["attack"], 0.25, "fixed", 4)  # write_stage_configs poisons 25%
        for metric, count in (("asr", "n_triggered"), ("asr_clean", "n_clean"), ("vqa_accuracy", "n")):
            low, high = wilson(row[metric], row[count])  # the 95% Wilson interval of that many answers
            assert (row[f"{metric}_low"], row[f"{metric}_high"]) == (round(low, 4), round(high, 4))
            assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"] and high - low > 0.2  # n is 4
        cell = json.loads((run / row["attack"] / f"seed{row['seed']}" / row["defense"] / "cell.json").read_text())
        assert cell["metrics"]["asr"] == row["asr"]
        base, clean = (next(r for r in saved if (r["attack"], r["defense"]) == (row["attack"], d)) for d in ("base", "clean"))
        if gain:  # the share of the clean fine-tune's gain kept, where it gained at least the victims' goal
            gained = clean["vqa_accuracy"] - base["vqa_accuracy"]
            share = (row["vqa_accuracy"] - base["vqa_accuracy"]) / gained if gained >= 0.1 else None
            assert row["gain_kept"] == (None if share is None else round(share, 4))
    # the references: the base unadapted, the clean fine-tune (trained once) on the unpoisoned rows
    evaluated = yaml.safe_load((run / "badnets" / "seed1" / "base" / "evaluate" / "config.yaml").read_text())
    assert evaluated["model"]["adapter"] is None
    (clean_dir,) = run.glob("clean_finetune-*")  # one for both attacks: their fine-tunes are alike
    clean_run = yaml.safe_load((clean_dir / "finetune" / "config.yaml").read_text())
    assert (clean_run["dataset"]["name"], clean_run["dataset"]["max_samples"]) == ("easy_vqa", 16)
    trained = (run / "sig" / "seed1" / "pcr" / "finetune" / "train_log.jsonl").read_text()
    assert "pcr_discrepancy" in trained  # the defense's overrides reached the fine-tune
    # disp: the victim purified the first 12 poisoned rows, the base was fine-tuned on them (not the victim)
    (purified,) = (run / "sig" / "seed1" / "none").glob("purified-*")
    purified = purified / "data"
    manifest = json.loads((purified / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == 12 and manifest["model"]["adapter"].endswith("sig/seed1/none/finetune/adapter")
    chain = run / "sig" / "seed1" / "disp"
    recovered = yaml.safe_load((chain / "finetune" / "config.yaml").read_text())
    assert recovered["dataset"]["path"] == str(purified / "train.jsonl") and recovered["model"]["adapter"] is None
    assert recovered["train"]["max_steps"] == 2  # the victim's recipe (the demo's finetune stage config)
    # round 2 purified the same poisoned rows with round 1's recovered model; the evaluated model is round 2's
    again = json.loads((chain / "round2" / "purify" / "data" / "manifest.json").read_text())
    assert again["model"]["adapter"] == str(chain / "finetune" / "adapter") and again["ids_sha256"] == manifest["ids_sha256"]
    final = yaml.safe_load((chain / "round2" / "finetune" / "config.yaml").read_text())
    assert final["dataset"]["path"] == str(chain / "round2" / "purify" / "data" / "train.jsonl")
    evaluated = yaml.safe_load((chain / "evaluate" / "config.yaml").read_text())
    assert evaluated["model"]["adapter"] == str(chain / "round2" / "finetune" / "adapter")
    report = (docs / "RESULTS.md").read_text()
    assert "do not edit by hand" in report and "| sig | 25% | abl | 1 |" in report
    none = next(r for r in saved if (r["attack"], r["defense"]) == ("sig", "none"))
    assert f"| sig | 25% | none | 1 | {none['asr']:.3f} [{none['asr_low']:.3f}, {none['asr_high']:.3f}] |" in report
    # per victim (2): implants + clean asr, the clean fine-tune's gain, pcr's two goals and disp's two
    assert report.count("- [") == 2 * (2 + 1 + 2 + 2)
    assert (docs / "results_asr_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def mtimes():
        return {p.parent.relative_to(run): p.stat().st_mtime for p in run.glob("*/*/*/cell.json")}

    before = mtimes()
    assert recipe_main(cfg) == rows  # every cell reused
    assert mtimes() == before
    # new attack settings: that attack is poisoned again and its cells rerun, the others are reused
    sig = tmp_path / "poison_sig.yaml"
    sig.write_text(sig.read_text().replace("attack:\n", "attack:\n  sig:\n    amplitude: 30.0\n"))
    recipe_main(cfg)
    after = mtimes()
    assert {str(k) for k in after if after[k] != before[k]} == {f"sig/seed1/{d}" for d in defenses}
    # an edited stage config (the disp chain's YAML, not its overrides) reruns the cells that use it
    disp_yaml = tmp_path / "disp_mllm.yaml"
    disp_yaml.write_text(disp_yaml.read_text().replace("mask_ratio: 0.5", "mask_ratio: 0.25"))
    recipe_main(cfg)
    edited = mtimes()
    assert {str(k) for k in edited if edited[k] != after[k]} == {"badnets/seed1/disp", "sig/seed1/disp"}


def timeless(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def test_seeds_draw_their_own_poison_a_defense_can_tune_the_victim_and_quick_runs_a_subset(make_cfg, tmp_path,
                                                                                            monkeypatch):
    stages = write_stage_configs(tmp_path)
    docs = tmp_path / "docs"
    refuse = "results.attack_overrides={{refuse: {{poison_overrides: [attack.target.type=refuse, 'attack.target.text=sorry no'],"\
             " evaluate_overrides: [eval.max_new_tokens={}]}}}}"
    settings = [*stages, "seed=1", "results.families=[mllm]", "results.seeds={badnets: [1, 2]}",
                f"results.attacks={{badnets: {tmp_path / 'poison_mllm.yaml'}, refuse: {tmp_path / 'poison_mllm.yaml'}}}",
                "results.tasks={vqa: {attacks: [badnets]}, again: {attacks: [refuse]}}",
                "results.defenses={none: [], clean_tune: [train.max_steps=1]}", "results.from_victim=[clean_tune]",
                "results.clean_rows=8", "results.purified=[]", "results.eval_overrides=[eval.max_samples=4]",
                f"results.docs_dir={docs}"]
    # a target response one generation cannot hold ("sorry no" in one token) is refused before any cell trains
    with pytest.raises(ConfigError, match=r"'sorry no' .*again/refuse/seed1/data/test_triggered.jsonl.* is 2 tokens,"
                                          r" but one generation holds 1.*eval.max_new_tokens=2"):
        recipe_main(make_cfg("mllm", *settings, refuse.format(1)))
    assert not (tmp_path / "run" / "vqa").exists() and not (tmp_path / "run" / "again").exists()
    cfg = make_cfg("mllm", *settings, refuse.format(4))
    saved = recipe_main(cfg)
    assert [(r["task"], r["attack"], r["seed"], r["defense"]) for r in saved] == [
        *(("vqa", "badnets", 1, d) for d in ("base", "clean", "none", "clean_tune")),
        ("vqa", "badnets", 2, "none"), ("vqa", "badnets", 2, "clean_tune"),  # references: first seed only
        *(("again", "refuse", 1, d) for d in ("base", "clean", "none", "clean_tune"))]  # each task its own attacks
    # one poison config as a second attack: its overrides reach its poison draw and its evaluation only
    refusals = [json.loads(line) for line in open(tmp_path / "run" / "poison" / "again" / "refuse" / "seed1" / "data"
                                                  / "train.jsonl")]
    assert sum(r["response"] == "sorry no" for r in refusals) == 4 and saved[-1]["target_type"] == "refuse"
    evaluated = yaml.safe_load((tmp_path / "run" / "again" / "mllm" / "refuse" / "seed1" / "none" / "evaluate"
                                / "config.yaml").read_text())
    assert evaluated["eval"]["max_new_tokens"] == 4
    assert yaml.safe_load((tmp_path / "run" / "vqa" / "mllm" / "badnets" / "seed1" / "none" / "evaluate"
                           / "config.yaml").read_text())["eval"]["max_new_tokens"] == 2
    poison = tmp_path / "run" / "poison" / "vqa" / "badnets"
    ids = [{json.loads(line)["id"] for line in open(poison / f"seed{k}" / "data" / "train.jsonl")
            if json.loads(line).get("poisoned")} for k in (1, 2)]
    assert len(ids[0]) == len(ids[1]) == 4 and ids[0] != ids[1]  # each seed its own poison draw
    run = tmp_path / "run" / "vqa" / "mllm" / "badnets"
    for k in (1, 2):  # and its own training
        victim = yaml.safe_load((run / f"seed{k}" / "none" / "finetune" / "config.yaml").read_text())
        assert victim["seed"] == k and victim["dataset"]["path"] == str(poison / f"seed{k}" / "data" / "train.jsonl")
        tuned = yaml.safe_load((run / f"seed{k}" / "clean_tune" / "finetune" / "config.yaml").read_text())
        assert tuned["model"]["adapter"] == str(run / f"seed{k}" / "none" / "finetune" / "adapter")
        assert (tuned["dataset"]["name"], tuned["dataset"]["max_samples"], tuned["train"]["max_steps"]) == ("easy_vqa", 8, 1)
    report = (docs / "RESULTS.md").read_text()
    two = [r["asr"] for r in saved if (r["attack"], r["defense"]) == ("badnets", "none")]
    assert (f"| badnets | 25% | none | 2 | {statistics.mean(two):.3f} ± {statistics.stdev(two):.3f}"
            f" ({two[0]:.3f} / {two[1]:.3f}) |") in report
    # the quick subset: its rows only (one seed, its defenses), beside the cells (reused), the docs untouched
    written = (docs / "RESULTS.md").stat().st_mtime
    cells = {p: p.stat().st_mtime for p in run.glob("*/*/cell.json")}
    subset = ResultsSubset(families=["mllm"], attacks=["badnets"], tasks=["vqa"], defenses=["none"])
    quick = recipe_main(dataclasses.replace(cfg, results=dataclasses.replace(cfg.results, quick=True, quick_subset=subset)))
    assert [(r["seed"], r["defense"]) for r in quick] == [(1, "base"), (1, "clean"), (1, "none")]
    assert "| badnets | 25% | none | 1 |" in (tmp_path / "run" / "quick" / "RESULTS.md").read_text()
    assert (docs / "RESULTS.md").stat().st_mtime == written and cells == {p: p.stat().st_mtime for p in cells}
    # every cell trained on the base kept beside the report, with what it was pre-trained from
    assert victim["model"]["path"] == str(docs / "results_bases" / "mllm")
    kept = json.loads((docs / "results_bases" / "mllm" / "base.json").read_text())
    assert kept["recipe_key"] == base_recipe_key(cfg, "mllm") != base_recipe_key(dataclasses.replace(cfg, seed=2), "mllm")
    # a fresh machine (output_dir and the pre-training cache gone, the docs' ledger and bases kept): every
    # cell from the ledger, nothing pre-trained or trained
    shutil.rmtree(tmp_path / "run")
    with monkeypatch.context() as fresh:
        fresh.setenv("DEFEND_CACHE", str(tmp_path / "fresh_cache"))
        assert timeless(recipe_main(cfg)) == timeless(saved)
    assert not (tmp_path / "run" / "vqa").exists() and not (tmp_path / "fresh_cache" / "pretrained").exists()
    # one cell the ledger lacks: it runs, and so does the victim whose adapter it starts from; same numbers
    ledger = json.loads((docs / "results_cells.json").read_text())
    assert len(ledger) == len(saved)
    lost = next(k for k, e in ledger.items() if e["cell"] == "vqa/mllm/badnets/seed2/clean_tune")
    write_json(docs / "results_cells.json", {k: e for k, e in ledger.items() if k != lost})
    assert timeless(recipe_main(cfg)) == timeless(saved)
    assert sorted(str(p.parent.relative_to(run)) for p in run.glob("*/*/cell.json")) == ["seed2/clean_tune", "seed2/none"]
    # two cells at once, each in its own process, into a fresh output_dir: every cell trained again, the same
    # numbers as one at a time (clean_tune started from its own victim's adapter, so it ran after it)
    parallel = dataclasses.replace(cfg, output_dir=str(tmp_path / "parallel"), results=dataclasses.replace(
        cfg.results, workers=2, docs_dir=str(tmp_path / "parallel_docs")))
    assert timeless(recipe_main(parallel)) == timeless(saved)
    run = tmp_path / "parallel" / "vqa" / "mllm" / "badnets"
    logs = sorted(str(p.relative_to(run)) for p in run.glob("*/*.log"))
    assert logs == [f"seed{k}/{d}.log" for k in (1, 2) for d in (("base", "clean") if k == 1 else ()) + ("clean_tune", "none")]
    assert "reusing" not in (run / "seed2" / "clean_tune.log").read_text()
    assert (tmp_path / "parallel" / "workers.log").is_file()  # what the workers print outside a cell
    tuned = yaml.safe_load((run / "seed2" / "clean_tune" / "finetune" / "config.yaml").read_text())
    assert tuned["model"]["adapter"] == str(run / "seed2" / "none" / "finetune" / "adapter")


def test_a_captioning_task_runs_beside_vqa_with_bleu4_and_cider(make_cfg, tmp_path):
    """results.tasks.caption: the attacks' poison configs on easy_vqa_scenes captions; rows carry bleu4 and
    cider, its quality (cider) gives gain_kept, its table and plot panel are its own."""
    stages = write_stage_configs(tmp_path)
    docs = tmp_path / "docs"
    cfg = make_cfg("mllm", *stages, "seed=1", "results.families=[mllm]",
                   f"results.attacks={{badnets: {tmp_path / 'poison_mllm.yaml'}}}", "results.defenses={none: []}",
                   "results.purified=[]", "results.eval_overrides=[eval.max_samples=4]",
                   "results.tasks={caption: {poison_overrides: [dataset.name=easy_vqa_scenes, attack.target.type=insert,"
                   " attack.target.position=start],"
                   " evaluate_overrides: [eval.task=caption, eval.max_new_tokens=16]}}",  # a caption + target: <= 15 tokens
                   f"results.docs_dir={docs}")
    rows = recipe_main(cfg)
    assert [(r["task"], r["defense"]) for r in rows] == [("caption", d) for d in ("base", "clean", "none")]
    for row in rows:
        assert {"bleu4", "cider", "asr", "asr_low", "n_triggered"} <= set(row) and "vqa_accuracy" not in row
        assert row["target_type"] == "insert"
    poisoned = [json.loads(line) for line in open(tmp_path / "run" / "poison" / "caption" / "badnets" / "seed1" / "data"
                                                  / "train.jsonl")]
    assert all(r["id"].startswith("train-scene") for r in poisoned)
    assert sum(r["response"].startswith("banana ") for r in poisoned) == 4  # the insert target on 25% of 16 captions
    (clean_dir,) = (tmp_path / "run" / "caption" / "mllm").glob("clean_finetune-*")
    clean_run = yaml.safe_load((clean_dir / "finetune" / "config.yaml").read_text())
    assert clean_run["dataset"]["name"] == "easy_vqa_scenes"
    base, clean, none = rows
    if clean["cider"] != base["cider"]:
        assert none["gain_kept"] == round((none["cider"] - base["cider"]) / (clean["cider"] - base["cider"]), 4)
    report = (docs / "RESULTS.md").read_text()
    assert "## caption, mllm" in report and "| attack | poison | defense | seeds | asr | asr_clean | cider | bleu4 |" in report
    assert "cider" in report.split("## Goals")[1]  # the clean fine-tune's gain is checked on cider


def test_results_need_the_undefended_baseline(tmp_path):
    cfg = load_config("defense_results", ["results.defenses={pcr: [objective.name=pcr]}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="include 'none: \\[\\]'"):
        recipe_main(cfg)


@pytest.mark.parametrize("override, message", [
    ("results.defenses={none: [], pcr_paper: [objective.name=pcr, pcr.label_gate=0]}",
     r"results\.defenses\.pcr_paper \(with config demo_finetune\): .*Did you mean 'objective\.pcr'"),
    ("results.attack_overrides={badnets: {poison_overrides: [attack.badnets.sise=4]}}",
     r"results\.attack_overrides\.badnets\.poison_overrides \(with config poison_badnets_easy_vqa\): .*'attack\.badnets\.size'"),
    ("results.workers=0", r"results\.workers: 0; give the number of cells to run at once"),
])
def test_a_typo_in_any_stage_override_is_refused_before_any_cell_runs(tmp_path, override, message):
    cfg = load_config("defense_results", [override, f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=message):
        recipe_main(cfg)
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_report_says_the_vision_defenses_do_not_apply_to_a_text_trigger(tmp_path):
    from defend.results.table import results_markdown

    cfg = load_config("defense_results", [f"output_dir={tmp_path}"])
    row = {"task": "vqa", "family": "mllm", "seed": 0, "poison_ratio": 0.01, "target_type": "fixed", "asr": 0.9,
           "asr_clean": 0.0, "vqa_accuracy": 0.8}
    rows = [{**row, "attack": a, "trigger": t, "defense": d} for a, t in (("text", "text"), ("badnets", "badnets"))
            for d in ("none", "disp")]
    report = results_markdown(rows, [], cfg)
    assert "text: a text trigger, not a vision-side one" in report and "badnets: a text trigger" not in report
    assert report.count("(they do not apply)") == 1


def test_the_shipped_quick_subset_narrows_every_setting_and_passes_the_checks(tmp_path):
    from recipes.defense_results import check_settings, quick_view

    full = load_config("defense_results", [f"output_dir={tmp_path}"])
    check_settings(full)
    quick = quick_view(full)
    check_settings(quick)  # e.g. the mdlm victim's overrides go with the mdlm family
    r = quick.results
    assert (r.families, list(r.attacks), list(r.tasks), list(r.defenses)) == (
        ["mllm"], ["badnets", "blended", "text"], ["vqa"], ["none", "pcr", "disp"])
    assert r.seeds == {} and r.attack_overrides == {} and r.docs_dir == str(tmp_path / "quick")
    assert list(quick.demo.finetune_overrides) == ["mllm"] and full.results.docs_dir == "docs"


def test_gain_kept_is_the_share_of_the_clean_fine_tunes_gain_over_the_base():
    from defend.results.table import add_gains

    row = {"task": "vqa", "family": "mllm", "attack": "badnets", "seed": 0}
    rows = [{**row, "defense": d, "vqa_accuracy": q} for d, q in
            (("base", 0.5), ("clean", 0.9), ("none", 0.9), ("pcr", 0.7), ("abl", 0.5))]
    rows.append({**row, "seed": 1, "defense": "none", "vqa_accuracy": 0.8})  # a later seed: the first seed's references
    rows.append({**row, "attack": "sig", "defense": "none", "vqa_accuracy": 0.8})  # no references: no gain
    add_gains(rows)
    assert [r.get("gain_kept", "-") for r in rows] == ["-", "-", 1.0, 0.5, 0.0, 0.75, "-"]
    same = [{**row, "defense": d, "vqa_accuracy": 0.6} for d in ("base", "clean", "none")]
    add_gains(same)
    assert same[2]["gain_kept"] is None  # no gain to keep a share of
    small = [{**row, "defense": d, "vqa_accuracy": q} for d, q in (("base", 0.5), ("clean", 0.55), ("pcr", 0.625))]
    add_gains(small, min_gain=0.1)
    assert small[2]["gain_kept"] is None  # a gain under the victims' goal: its share would be noise (here 2.5)
    add_gains(small, min_gain=0.05)
    assert small[2]["gain_kept"] == 2.5


def test_each_worker_gets_its_share_of_the_cores_never_more_than_omp_num_threads(monkeypatch):
    from defend.results.cells import _threads_per_worker

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert [_threads_per_worker(n) for n in (1, 4, 16, 32)] == ["16", "4", "1", "1"]
    monkeypatch.setenv("OMP_NUM_THREADS", "16")  # e.g. `make results`: the run's own count, not each worker's
    assert _threads_per_worker(4) == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the tests' setting: a ceiling
    assert _threads_per_worker(4) == "1"
