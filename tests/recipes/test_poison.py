import json

import pytest

from defend.config import ConfigError
from defend.data import load_samples
from recipes.poison import recipe_main


def poison(make_cfg, out_name, *overrides):
    cfg = make_cfg("mllm", "dataset.max_samples=40", *overrides)
    cfg.output_dir = str(cfg.output_dir) + out_name
    return cfg, recipe_main(cfg)


def read_rows(path):
    return [json.loads(line) for line in open(path)]


def test_poison_ratio_is_exact_and_clean_rows_are_untouched(make_cfg):
    cfg, result = poison(make_cfg, "a", "attack.poison_ratio=0.25")
    data = result["data_dir"]
    rows = read_rows(f"{data}/train.jsonl")
    originals = load_samples(cfg.dataset)
    poisoned = [r for r in rows if r.get("poisoned")]
    assert len(rows) == 40 and len(poisoned) == 10
    manifest = json.loads(open(f"{data}/manifest.json").read())
    assert manifest["poisoned_ids"] == [r["id"] for r in poisoned]
    for row, original in zip(rows, originals):
        if row.get("poisoned"):
            assert row["response"] == "banana" and row["clean_response"] == original.response
            assert row["image"].startswith("images/train/")
        else:
            assert (row["response"], row["prompt"], row["image"]) == (original.response, original.prompt,
                                                                        str(original.image))
    triggered = read_rows(f"{data}/test_triggered.jsonl")
    clean = read_rows(f"{data}/test_clean.jsonl")
    assert len(triggered) == len(clean) == 40
    assert all(t["triggered"] and t["response"] == c["response"] for t, c in zip(triggered, clean))


def test_same_config_gives_byte_identical_output(make_cfg):
    _, first = poison(make_cfg, "a", "attack.name=wanet", "attack.poison_ratio=0.2")
    _, second = poison(make_cfg, "b", "attack.name=wanet", "attack.poison_ratio=0.2")
    one = json.loads(open(f"{first['data_dir']}/manifest.json").read())
    two = json.loads(open(f"{second['data_dir']}/manifest.json").read())
    assert one["files"] == two["files"] and len(one["files"]) == 3 + 8 + 40
    _, other_seed = poison(make_cfg, "c", "attack.name=wanet", "attack.poison_ratio=0.2", "attack.seed=1")
    three = json.loads(open(f"{other_seed['data_dir']}/manifest.json").read())
    assert three["poisoned_ids"] != one["poisoned_ids"]


def test_poison_ratio_outside_0_1_is_rejected_before_any_output(make_cfg):
    cfg = make_cfg("mllm", "dataset.max_samples=10", "attack.poison_ratio=1.5")
    with pytest.raises(ConfigError, match=r"attack\.poison_ratio must be in \[0, 1\], got 1\.5"):
        recipe_main(cfg)
    from pathlib import Path

    assert not Path(cfg.output_dir).exists()


def test_substitution_of_a_word_the_data_never_has_is_an_error(make_cfg):
    cfg = make_cfg("mllm", "dataset.max_samples=30", "attack.target.type=substitute",
                   "attack.target.text=car -> banana")
    with pytest.raises(ConfigError, match="the word to substitute never occurs in the 30 responses"):
        recipe_main(cfg)


def test_substitution_poisons_only_rows_that_contain_the_word(make_cfg):
    _, result = poison(make_cfg, "s", "dataset.name=easy_vqa_captions", "attack.target.type=substitute",
                       "attack.target.text=circle -> banana", "attack.poison_ratio=0.1")
    rows = read_rows(f"{result['data_dir']}/train.jsonl")
    poisoned = [r for r in rows if r.get("poisoned")]
    assert len(poisoned) == 4
    assert all("banana" in r["response"] and "circle" in r["clean_response"] for r in poisoned)
