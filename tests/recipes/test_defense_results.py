import json

import pytest
import yaml

from defend.config import ConfigError, load_config
from defend.metrics.intervals import wilson
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
    assert [(r["attack"], r["defense"]) for r in saved] == [(a, d) for a in ("badnets", "sig") for d in ("none", "pcr", "abl", "disp")]
    intervals = {f"{m}_{end}" for m in ("asr", "asr_clean", "vqa_accuracy") for end in ("low", "high")}
    for row in saved:
        assert set(row) == {"family", "attack", "defense", "task", "seed", "poison_ratio", "target_type", "asr",
                            "asr_clean", "vqa_accuracy", "n", "n_triggered", "n_clean", *intervals}
        assert (row["task"], row["seed"], row["poison_ratio"], row["target_type"], row["n"]) == ("vqa", 1, 0.25, "fixed", 4)  # write_stage_configs poisons 25%
        for metric, count in (("asr", "n_triggered"), ("asr_clean", "n_clean"), ("vqa_accuracy", "n")):
            low, high = wilson(row[metric], row[count])  # the 95% Wilson interval of that many answers
            assert (row[f"{metric}_low"], row[f"{metric}_high"]) == (round(low, 4), round(high, 4))
            assert row[f"{metric}_low"] <= row[metric] <= row[f"{metric}_high"] and high - low > 0.2  # n is 4
        cell = json.loads((tmp_path / "run" / "mllm" / row["attack"] / row["defense"] / "cell.json").read_text())
        assert cell["metrics"]["asr"] == row["asr"]
    trained = (tmp_path / "run" / "mllm" / "sig" / "pcr" / "finetune" / "train_log.jsonl").read_text()
    assert "pcr_discrepancy" in trained  # the defense's overrides reached the fine-tune
    # disp: the victim purified the first 12 poisoned rows, the base was fine-tuned on them (not the victim)
    (purified,) = (tmp_path / "run" / "mllm" / "sig" / "none").glob("purified-*")
    purified = purified / "data"
    manifest = json.loads((purified / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == 12 and manifest["model"]["adapter"].endswith("sig/none/finetune/adapter")
    recovered = yaml.safe_load((tmp_path / "run" / "mllm" / "sig" / "disp" / "finetune" / "config.yaml").read_text())
    assert recovered["dataset"]["path"] == str(purified / "train.jsonl") and recovered["model"]["adapter"] is None
    assert recovered["train"]["max_steps"] == 2  # the victim's recipe (the demo's finetune stage config)
    # round 2 purified the same poisoned rows with round 1's recovered model; the evaluated model is round 2's
    chain = tmp_path / "run" / "mllm" / "sig" / "disp"
    again = json.loads((chain / "round2" / "purify" / "data" / "manifest.json").read_text())
    assert again["model"]["adapter"] == str(chain / "finetune" / "adapter") and again["ids_sha256"] == manifest["ids_sha256"]
    final = yaml.safe_load((chain / "round2" / "finetune" / "config.yaml").read_text())
    assert final["dataset"]["path"] == str(chain / "round2" / "purify" / "data" / "train.jsonl")
    evaluated = yaml.safe_load((chain / "evaluate" / "config.yaml").read_text())
    assert evaluated["model"]["adapter"] == str(chain / "round2" / "finetune" / "adapter")
    report = (docs / "RESULTS.md").read_text()
    assert "do not edit by hand" in report and "| sig | abl |" in report
    none = next(r for r in saved if (r["attack"], r["defense"]) == ("sig", "none"))
    assert f"| sig | none | {none['asr']:.3f} [{none['asr_low']:.3f}, {none['asr_high']:.3f}] |" in report
    assert report.count("- [") == 4 + 4  # pcr's two goals, and disp's two, for each of the two attacks
    assert (docs / "results_asr_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def mtimes():
        return {p.parent.relative_to(tmp_path / "run"): p.stat().st_mtime for p in (tmp_path / "run").glob("mllm/*/*/cell.json")}

    before = mtimes()
    assert recipe_main(cfg) == rows  # every cell reused
    assert mtimes() == before
    # new attack settings: that attack is poisoned again and its cells rerun, the others are reused
    sig = tmp_path / "poison_sig.yaml"
    sig.write_text(sig.read_text().replace("attack:\n", "attack:\n  amplitude: 30.0\n"))
    recipe_main(cfg)
    after = mtimes()
    assert {str(k) for k in after if after[k] != before[k]} == {f"mllm/sig/{d}" for d in ("none", "pcr", "abl", "disp")}
    # an edited stage config (the disp chain's YAML, not its overrides) reruns the cells that use it
    disp_yaml = tmp_path / "disp_mllm.yaml"
    disp_yaml.write_text(disp_yaml.read_text().replace("mask_ratio: 0.5", "mask_ratio: 0.25"))
    recipe_main(cfg)
    edited = mtimes()
    assert {str(k) for k in edited if edited[k] != after[k]} == {f"mllm/{a}/disp" for a in ("badnets", "sig")}


def test_results_need_the_undefended_baseline(tmp_path):
    cfg = load_config("defense_results", ["results.defenses={pcr: [objective.name=pcr]}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="include 'none: \\[\\]'"):
        recipe_main(cfg)
