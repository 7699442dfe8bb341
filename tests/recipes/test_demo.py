import json

import pytest
import yaml

from defend.metrics.vqa import normalize_answer
from defend.models.tiny import cache_root
from recipes.demo import recipe_main
from tests.conftest import TINY_TEST_OVERRIDES


def write_stage_configs(tmp_path):
    """Stage configs like the shipped demo's, on the small tiny model and a handful of samples."""
    tiny = dict(item.split("=", 1) for item in TINY_TEST_OVERRIDES)
    common = {"model": {"family": "mllm", "path": "tiny"},
              "tiny": {k.split(".")[1]: int(v) for k, v in tiny.items() if k.startswith("tiny.")},
              "train": {"max_length": 64, "micro_batch_size": 4, "max_steps": 2}}
    stages = {
        "vision": {**common, "dataset": {"name": "easy_vqa_captions", "max_samples": 16}},
        "pretrain": {**common, "dataset": {"name": "easy_vqa", "max_samples": 16}, "lora": {"enabled": False},
                     "train": {**common["train"], "freeze_vision_tower": True}},
        "finetune": {**common, "dataset": {"name": "easy_vqa", "max_samples": 16}},
        "evaluate": {**common, "dataset": {"name": "easy_vqa", "split": "test"},
                     "eval": {"max_samples": 6, "batch_size": 3, "max_new_tokens": 2}},
    }
    stages["poison"] = {"dataset": {"name": "easy_vqa", "max_samples": 16},
                        "attack": {"name": "badnets", "poison_ratio": 0.25, "badnets": {"size": 16}}}
    for stage, body in stages.items():
        (tmp_path / f"{stage}_mllm.yaml").write_text(yaml.safe_dump(body))
    stage = f"'{tmp_path}/pretrain_{{family}}.yaml'"  # quoted: YAML reads a bare {family} as a mapping
    return [f"demo.vision_config={tmp_path}/vision_mllm.yaml", f"demo.pretrain_configs=[{stage},{stage}]",
            *(f"demo.{stage}_config={tmp_path}/{stage}_{{family}}.yaml" for stage in ("finetune", "evaluate")),
            f"demo.poison_config={tmp_path}/poison_mllm.yaml"]


def test_demo_chains_the_stages_writes_the_table_and_reuses_the_cached_base(make_cfg, tmp_path):
    stage_overrides = write_stage_configs(tmp_path)
    cfg = make_cfg("mllm", "demo.families=[mllm]", *stage_overrides, "demo.poison_overrides=[attack.poison_ratio=0.5]")
    results = recipe_main(cfg)
    row = results["mllm"]
    assert "overall" in row["base"] and "overall" in row["finetuned"] and "overall" in row["backdoored"]
    assert {"asr", "asr_clean"} <= row["backdoored"].keys() and {"asr", "asr_clean"} <= row["finetuned"].keys()
    assert "asr" not in row["base"]  # the base is evaluated on the clean test split only
    manifest = json.loads((tmp_path / "run" / "poison" / "data" / "manifest.json").read_text())
    assert manifest["counts"]["poisoned"] == 8  # demo.poison_overrides: half of the 16, not the config's 25%
    trained_on = yaml.safe_load((tmp_path / "run" / "mllm" / "finetune_backdoored" / "config.yaml").read_text())
    assert trained_on["dataset"]["path"].endswith("poison/data/train.jsonl")
    assert set(row["checks"]) >= {"fine-tuned vqa_accuracy >= 0.85", "backdoored asr >= 0.9"}
    assert row["n"] == 6 and row["seconds"]["pretrain"] > 0
    pretrain = tmp_path / "run" / "pretrain"
    assert (pretrain / "vision0" / "model").is_dir()
    assert (pretrain / "mllm" / "mllm1" / "model").is_dir()  # the second language stage ran on the first
    first = yaml.safe_load((pretrain / "mllm" / "mllm0" / "config.yaml").read_text())
    assert first["model"]["vision_tower_from"].endswith(tuple(str(p.name) for p in (cache_root() / "pretrained").glob("vision-*")))
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| vqa_accuracy overall |" in table and "| asr |" in table and "majority-answer baseline" in table
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["families"]["mllm"]["finetuned"]["overall"] == row["finetuned"]["overall"]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "mllm" / "eval_finetuned" / "predictions.jsonl")]
    evaluated = [r for r in rows if r["set"] == "clean"]
    assert len(evaluated) == 6 and sum(r["set"] == "triggered" for r in rows) == 6
    assert sum(normalize_answer(r["prediction"]) == r["reference"] for r in evaluated) / 6 == row["finetuned"]["overall"]

    again = recipe_main(cfg)  # same stage settings: the pre-trained base comes from the cache
    assert again["mllm"]["seconds"]["pretrain"] == 0.0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["vision_pretrain_seconds"] == 0.0
    assert again["mllm"]["base"] == row["base"]


def test_finetune_overrides_for_a_family_the_demo_does_not_run_are_an_error(tmp_path):
    from defend.config import ConfigError, load_config

    cfg = load_config("demo", ["demo.finetune_overrides={mdml: [train.max_steps=1]}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"\['mdml'\] not in demo.families"):
        recipe_main(cfg)
    assert not any(tmp_path.iterdir())  # refused before any stage ran
