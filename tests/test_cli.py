import json
import subprocess
import sys

import pytest

from defend import cli
from tests.conftest import TINY_TEST_OVERRIDES


def test_a_copied_recipe_file_runs_with_defend_run(tmp_path):
    copied = tmp_path / "my_finetune.py"
    assert cli.main(["cp", "finetune", str(copied)]) == 0
    edited = copied.read_text().replace("summary = train_summary(result, saved)",
                                        'summary = {**train_summary(result, saved), "first_loss": -1.0}')
    assert "-1.0" in edited
    copied.write_text(edited)
    out = tmp_path / "run"
    assert cli.main(["run", str(copied), "--config", "finetune_tiny_mllm", *TINY_TEST_OVERRIDES,
                     "train.max_steps=2", "dataset.max_samples=8", f"output_dir={out}"]) == 0
    assert json.loads((out / "train_summary.json").read_text())["first_loss"] == -1.0  # the edited copy ran


def test_recipe_file_runs_as_a_script_and_reports_errors_without_a_traceback(tmp_path):
    from defend.runner import RECIPES_DIR

    result = subprocess.run([sys.executable, str(RECIPES_DIR / "evaluate.py"), "--config", "evaluate_tiny_mllm",
                             "eval.batch_size=many", f"output_dir={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "'eval.batch_size' must be int" in result.stderr and "Traceback" not in result.stderr


def test_ls_lists_every_recipe_with_its_summary_and_every_config(capsys):
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "evaluate", "finetune", "poison", "pretrain_vision"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split()) > 2, line  # the docstring's first line follows the name
    assert "demo_pretrain_vision" in out and "poison_badnets_easy_vqa" in out


@pytest.mark.parametrize("recipe, config", [("purify", "purify_tiny_mllm"), ("evaluate", "evaluate_tiny_mllm"),
                                            ("defense_results", "defense_results")])
def test_a_one_process_recipe_under_a_launcher_is_refused_before_any_work(recipe, config, tmp_path, capsys):
    """Four purifications into one folder (``defend run purify launcher=torchrun nproc=4``) never start."""
    out = tmp_path / "run"
    assert cli.main(["run", recipe, "--config", config, "launcher=torchrun", "nproc=4", f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"launcher=torchrun: the {recipe} recipe runs as one process (it supports none)" in err
    assert "run it with launcher=none" in err and not out.exists()


def test_the_training_recipes_declare_every_launcher():
    from defend.runner import recipe_launchers, recipe_names, resolve_recipe

    declared = {name: recipe_launchers(resolve_recipe(name)) for name in recipe_names()}
    assert {n for n, launchers in declared.items() if launchers != ("none",)} == {"finetune", "pretrain_vision"}
    assert declared["finetune"] == ("none", "torchrun", "deepspeed", "ray")
