"""The results recipes take another architecture by ``tiny.arch`` alone: defense_results pre-trains,
poisons, defends (PCR, DiSP) and evaluates a Qwen2.5-VL layout (M-RoPE, flattened patches, the
merger as projector), and disp_sweep sweeps its victim."""
import json

import yaml

from recipes.defense_results import recipe_main as defense_results
from recipes.disp_sweep import recipe_main as disp_sweep
from tests.recipes.test_demo import write_stage_configs
from tests.recipes.test_disp_sweep import SMALL_EVAL


def test_defense_results_and_disp_sweep_on_a_qwen2_5_vl_layout(make_cfg, tmp_path):
    stages = write_stage_configs(tmp_path)
    poison = next(s.split("=", 1)[1] for s in stages if s.startswith("demo.poison_config="))
    (tmp_path / "disp.yaml").write_text(yaml.safe_dump({
        "dataset": {"name": "jsonl", "max_samples": 8}, "purify": {"mask_ratio": 0.5, "block_size": 4, "batch_size": 4},
        "eval": {"max_new_tokens": 2}, "train": {"max_length": 64}}))
    docs = tmp_path / "docs"
    cfg = make_cfg("mllm", *stages, "seed=2", "tiny.arch=qwen2_5_vl", "results.families=[mllm]",
                   f"results.attacks={{badnets: {poison}}}",
                   "results.defenses={none: [], pcr: [objective.name=pcr, objective.pcr.patch_size=16], disp: []}",
                   f"results.disp_config={tmp_path / 'disp.yaml'}", "results.eval_overrides=[eval.max_samples=4]",
                   "results.references=false", f"results.docs_dir={docs}")
    rows = defense_results(cfg)
    assert [(r["attack"], r["defense"]) for r in rows] == [("badnets", d) for d in ("none", "pcr", "disp")]
    victim = tmp_path / "run" / "vqa" / "mllm" / "badnets" / "seed2" / "none"
    trained = yaml.safe_load((victim / "finetune" / "config.yaml").read_text())
    assert json.loads(open(f"{trained['model']['path']}/config.json").read())["model_type"] == "qwen2_5_vl"

    sweep = make_cfg("mllm", f"model.path={trained['model']['path']}", f"model.adapter={victim / 'finetune' / 'adapter'}",
                     f"eval.poison_dir={tmp_path / 'run' / 'poison' / 'vqa' / 'badnets' / 'seed2' / 'data'}", "sweep.mask_ratios=[0.0, 0.5]",
                     "sweep.selections=[saliency]",
                     f"sweep.evaluate_overrides={json.dumps([o for o in SMALL_EVAL if o != 'model.path=tiny'])}",
                     f"output_dir={tmp_path / 'sweep'}")
    points = disp_sweep(sweep)
    assert len(points) == 2
