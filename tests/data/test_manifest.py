"""Readers of a poison/purify data folder check it against its manifest before any model loads: a
changed, missing, truncated or extra file is refused by name, with the fix."""
import shutil
from pathlib import Path

import pytest

from defend.config import ConfigError, dump_config, load_config
from defend.data.manifest import verify_data_folder
from tests.conftest import TINY_TEST_OVERRIDES

# a model folder that does not exist: a run that got past the data check fails on loading it
NO_MODEL = ["model.path=/nonexistent/model", "model.family=mllm"]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, Path]:
    """A real poison run's data folder (BadNets: images written for every split) and its config file."""
    from recipes.poison import recipe_main as poison

    out = tmp_path_factory.mktemp("poison")
    cfg = load_config(None, [*TINY_TEST_OVERRIDES, "dataset.name=easy_vqa", "dataset.max_samples=6",
                             "attack.name=badnets", "attack.poison_ratio=0.5", f"output_dir={out}"])
    (out / "poison.yaml").write_text(dump_config(cfg))
    return Path(poison(cfg)["data_dir"]), out / "poison.yaml"


@pytest.fixture
def data(written, tmp_path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(written[0], copy)
    return copy


def run(recipe: str, tmp_path: Path, *overrides: str):
    from defend.runner import run_recipe

    return run_recipe(recipe, None, [*TINY_TEST_OVERRIDES, *NO_MODEL, f"output_dir={tmp_path / 'out'}", *overrides])


def assert_refused_before_the_model(error, tmp_path: Path, *words: str) -> None:
    message = str(error.value)
    for word in (*words, "does not match its manifest.json", "re-run `defend run poison`"):
        assert word in message, message
    assert not (tmp_path / "out" / "config.yaml").exists()  # no run started, nothing loaded


def test_the_written_folder_passes_and_its_manifest_records_every_size(written, tmp_path):
    folder, _ = written
    manifest = verify_data_folder(folder, "eval.poison_dir")
    images = [name for name in manifest["files"] if name.startswith("images/")]
    assert images and set(manifest["sizes"]) == set(manifest["files"])
    assert manifest["sizes"]["train.jsonl"] == (folder / "train.jsonl").stat().st_size
    # both readers get past the check to the model, which this config lacks
    for recipe, data in (("finetune", f"dataset.path={folder / 'train.jsonl'}"), ("evaluate", f"eval.poison_dir={folder}")):
        with pytest.raises(Exception) as error:
            run(recipe, tmp_path, "dataset.name=jsonl", data)
        assert "manifest" not in str(error.value) and "/nonexistent/model" in str(error.value), str(error.value)


def test_a_changed_byte_in_train_jsonl_is_refused_by_finetune(data, tmp_path):
    train = data / "train.jsonl"
    raw = bytearray(train.read_bytes())
    at = raw.index(b'"response": "') + len(b'"response": "')
    raw[at] = ord("X") if raw[at] != ord("X") else ord("Y")  # same size, one answer changed
    train.write_bytes(bytes(raw))
    with pytest.raises(ConfigError) as error:
        run("finetune", tmp_path, "dataset.name=jsonl", f"dataset.path={train}")
    assert_refused_before_the_model(error, tmp_path, "dataset.path", str(data), "'train.jsonl'", "sha256")


def test_a_missing_image_is_refused_by_evaluate(data, tmp_path):
    image = min((data / "images" / "test_triggered").iterdir())
    image.unlink()
    with pytest.raises(ConfigError) as error:
        run("evaluate", tmp_path, f"eval.poison_dir={data}")
    assert_refused_before_the_model(error, tmp_path, "eval.poison_dir", f"'images/test_triggered/{image.name}' is missing")


def test_a_truncated_image_is_refused_by_finetune(data, tmp_path):
    image = min((data / "images" / "train").iterdir())
    size = image.stat().st_size
    image.write_bytes(image.read_bytes()[: size // 2])
    with pytest.raises(ConfigError) as error:
        run("finetune", tmp_path, "dataset.name=jsonl", f"dataset.path={data / 'train.jsonl'}")
    assert_refused_before_the_model(error, tmp_path, f"'images/train/{image.name}' has {size // 2} bytes",
                                    f"records {size}")


def test_a_truncated_test_set_and_an_extra_file_are_refused(data, tmp_path):
    (data / "notes.txt").write_text("added by hand")
    with pytest.raises(ConfigError, match="'notes.txt' is not listed in it"):
        verify_data_folder(data, "eval.poison_dir")
    (data / "notes.txt").unlink()
    rows = (data / "test_clean.jsonl").read_text().splitlines(keepends=True)
    (data / "test_clean.jsonl").write_text("".join(rows[:-1]))
    with pytest.raises(ConfigError) as error:
        run("evaluate", tmp_path, f"eval.poison_dir={data}")
    assert_refused_before_the_model(error, tmp_path, "'test_clean.jsonl' has")


def test_defense_results_refuses_to_reuse_a_changed_poison_folder(written, tmp_path):
    import logging

    from defend.results.stages import poisoned_data

    _, config = written
    out, log = tmp_path / "poison", logging.getLogger("test")
    made = poisoned_data(str(config), [], out, log)
    stamp = (out / "cell.json").stat().st_mtime_ns
    assert poisoned_data(str(config), [], out, log) == made == str(out / "data")  # the same settings: reused
    assert (out / "cell.json").stat().st_mtime_ns == stamp
    (out / "data" / "test_triggered.jsonl").write_text("")
    with pytest.raises(ConfigError, match="'test_triggered.jsonl' has 0 bytes"):
        poisoned_data(str(config), [], out, log)
