import json

import yaml

from defend.metrics.vqa import normalize_answer
from recipes.demo import recipe_main
from tests.conftest import TINY_TEST_OVERRIDES


def write_stage_configs(tmp_path):
    """Stage configs like the shipped demo's, on the small tiny model and a handful of samples."""
    tiny = dict(item.split("=", 1) for item in TINY_TEST_OVERRIDES)
    common = {"model": {"family": "mllm", "path": "tiny"},
              "tiny": {k.split(".")[1]: int(v) for k, v in tiny.items() if k.startswith("tiny.")},
              "train": {"max_length": 64, "micro_batch_size": 4, "max_steps": 2}}
    stages = {
        "pretrain": {**common, "dataset": {"name": "easy_vqa_captions", "max_samples": 16}, "lora": {"enabled": False}},
        "finetune": {**common, "dataset": {"name": "easy_vqa", "max_samples": 16}},
        "evaluate": {**common, "dataset": {"name": "easy_vqa", "split": "test"},
                     "eval": {"max_samples": 6, "batch_size": 3, "max_new_tokens": 2}},
    }
    for stage, body in stages.items():
        (tmp_path / f"{stage}_mllm.yaml").write_text(yaml.safe_dump(body))
    stage = f"'{tmp_path}/pretrain_{{family}}.yaml'"  # quoted: YAML reads a bare {family} as a mapping
    return [f"demo.pretrain_configs=[{stage},{stage}]",
            *(f"demo.{stage}_config={tmp_path}/{stage}_{{family}}.yaml" for stage in ("finetune", "evaluate"))]


def test_demo_chains_the_stages_writes_the_table_and_reuses_the_cached_base(make_cfg, tmp_path):
    stage_overrides = write_stage_configs(tmp_path)
    cfg = make_cfg("mllm", "demo.families=[mllm]", *stage_overrides)
    results = recipe_main(cfg)
    row = results["mllm"]
    assert "overall" in row["base"] and "overall" in row["finetuned"]
    assert row["n"] == 6 and row["seconds"]["pretrain"] > 0
    assert (tmp_path / "run" / "mllm" / "pretrain1" / "model").is_dir()  # the second stage ran on the first
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| overall |" in table and "majority-answer baseline" in table
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["families"]["mllm"]["finetuned"]["overall"] == row["finetuned"]["overall"]
    evaluated = [json.loads(line) for line in open(tmp_path / "run" / "mllm" / "eval_finetuned" / "predictions.jsonl")]
    assert sum(normalize_answer(r["prediction"]) == r["reference"] for r in evaluated) / 6 == row["finetuned"]["overall"]

    again = recipe_main(cfg)  # same stage settings: the pre-trained base comes from the cache
    assert again["mllm"]["seconds"]["pretrain"] == 0.0
    assert again["mllm"]["base"] == row["base"]
