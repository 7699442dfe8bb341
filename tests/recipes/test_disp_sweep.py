"""The mask-ratio x selection sweep: every point is the evaluate run it names, the unmasked model runs
once, finished points are reused, and the table and plot are written."""
import json
from pathlib import Path

import pytest

from defend.config import ConfigError
from tests.conftest import TINY_TEST_OVERRIDES


@pytest.fixture(scope="module")
def poison_dir(tmp_path_factory):
    from defend.config import load_config
    from recipes.poison import recipe_main as poison

    out = tmp_path_factory.mktemp("poison")
    return poison(load_config(None, [*TINY_TEST_OVERRIDES, "dataset.max_samples=12", f"output_dir={out}"]))["data_dir"]


SMALL_EVAL = [*TINY_TEST_OVERRIDES, "eval.max_samples=12", "eval.batch_size=6", "eval.max_new_tokens=2"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from defend.config import load_config
    from recipes.finetune import recipe_main as finetune

    out = tmp_path_factory.mktemp("victim")
    return finetune(load_config("finetune_tiny_mllm", [*TINY_TEST_OVERRIDES, "dataset.max_samples=8",
                                                       "train.max_steps=2", f"output_dir={out}"]))["saved"]


def sweep_cfg(make_cfg, poison_dir, *extra):
    return make_cfg("mllm", f"eval.poison_dir={poison_dir}", "sweep.mask_ratios=[0.0, 0.5]",
                    "sweep.selections=[saliency, random]", f"sweep.evaluate_overrides={json.dumps(SMALL_EVAL)}", *extra)


def test_each_point_is_the_masked_evaluate_run_and_the_unmasked_one_runs_once(make_cfg, poison_dir, adapter,
                                                                              tmp_path):
    from recipes.disp_sweep import recipe_main as sweep
    from recipes.evaluate import recipe_main as evaluate

    cfg = sweep_cfg(make_cfg, poison_dir, f"model.adapter={adapter}")
    rows = sweep(cfg)
    assert [(r["selection"], r["mask_ratio"]) for r in rows] == [("saliency", 0.0), ("saliency", 0.5),
                                                                 ("random", 0.0), ("random", 0.5)]
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["random_0.5", "saliency_0.5", "unmasked"]
    assert rows[0] == {**rows[2], "selection": "saliency"}  # one unmasked run starts both lines
    direct = evaluate(make_cfg("mllm", *SMALL_EVAL, f"eval.poison_dir={poison_dir}", "purify.mask_ratio=0.5",
                               "purify.selection=random", f"model.adapter={adapter}", f"output_dir={tmp_path / 'direct'}"))
    for key in ("asr", "asr_clean", "vqa_accuracy"):
        assert rows[3][key] == direct[key]
    from defend.config import load_config

    point = load_config(str(out / "random_0.5" / "config.yaml"))
    assert point.model.adapter == adapter and point.purify.mask_ratio == 0.5 and point.purify.selection == "random"
    predictions = (out / "random_0.5" / "predictions.jsonl").read_text()
    assert predictions == (tmp_path / "direct" / "predictions.jsonl").read_text()
    assert json.loads((out / "sweep.json").read_text()) == rows
    assert (out / "sweep.png").stat().st_size > 10_000 and "| random | 0.5 |" in (out / "sweep.md").read_text()

    stamp = (out / "saliency_0.5" / "cell.json").stat().st_mtime_ns
    assert sweep(cfg) == rows  # finished points are reused, not re-run
    assert (out / "saliency_0.5" / "cell.json").stat().st_mtime_ns == stamp


def test_an_edited_evaluate_yaml_reruns_the_points_when_it_changes_what_they_read(make_cfg, poison_dir, adapter,
                                                                                       tmp_path):
    from defend.config import load_config
    from recipes.disp_sweep import recipe_main as sweep

    yaml_file = tmp_path / "my_evaluate.yaml"
    yaml_file.write_text((Path(__file__).parents[2] / "recipes" / "configs" / "evaluate_tiny_mllm.yaml").read_text())
    cfg = sweep_cfg(make_cfg, poison_dir, f"model.adapter={adapter}", f"sweep.evaluate_config={yaml_file}",
                    "sweep.selections=[random]")
    out = tmp_path / "run"

    def stamps():
        return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/cell.json")}

    sweep(cfg)
    first = stamps()
    assert sorted(first) == ["random_0.5", "unmasked"]
    yaml_file.write_text(yaml_file.read_text() + "slurm:\n  time: '09:00:00'\nheartbeat_s: 5\n")  # nothing evaluate reads
    sweep(cfg)
    assert stamps() == first
    yaml_file.write_text(yaml_file.read_text().replace("eval:\n", "eval:\n  max_triggered_samples: 5\n"))  # read by every point
    rows = sweep(cfg)
    again = stamps()
    assert again.keys() == first.keys() and all(again[k] != first[k] for k in first)  # in the file, not an override
    assert load_config(str(out / "random_0.5" / "config.yaml")).eval.max_triggered_samples == 5
    assert all(r["asr"] * 5 == round(r["asr"] * 5) for r in rows)  # measured on 5 triggered questions now


def test_a_sweep_without_a_poison_folder_or_with_a_ratio_of_one_is_refused(make_cfg, poison_dir):
    from recipes.disp_sweep import recipe_main as sweep

    with pytest.raises(ConfigError, match="eval.poison_dir"):
        sweep(make_cfg("mllm"))
    with pytest.raises(ConfigError, match="sweep.mask_ratios"):
        sweep(sweep_cfg(make_cfg, poison_dir, "sweep.mask_ratios=[0.5, 1.0]"))
