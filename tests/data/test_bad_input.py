"""Every bad input fails with a message naming the file/row/key and leaves no output behind."""
import json
import shutil
from pathlib import Path

import easy_vqa
import pytest

from defend import cli
from defend.config import ConfigError
from defend.data import DataError
from recipes.finetune import recipe_main as finetune


@pytest.fixture
def dataset(tmp_path):
    """A 4-row jsonl set of real easy-vqa images copied beside it (relative paths)."""
    images = easy_vqa.get_train_image_paths()
    rows = []
    for i in range(4):
        shutil.copy(images[i], tmp_path / f"{i}.png")
        rows.append({"id": f"row{i}", "image": f"{i}.png", "prompt": "what color is the shape?", "response": "blue"})
    path = tmp_path / "data.jsonl"

    def write(mutate=lambda rows: None) -> Path:
        changed = json.loads(json.dumps(rows))
        mutate(changed)
        path.write_text("".join(json.dumps(r) + "\n" for r in changed))
        return path

    return write


def run_finetune(make_cfg, data: Path, *overrides: str):
    cfg = make_cfg("mllm", "dataset.name=jsonl", f"dataset.path={data}", "train.max_steps=1",
                   "train.micro_batch_size=2", *overrides)
    return cfg, lambda: finetune(cfg)


def assert_no_output(cfg):
    assert not Path(cfg.output_dir).exists(), list(Path(cfg.output_dir).rglob("*"))


def test_corrupt_image_is_named_and_nothing_is_written(make_cfg, dataset, tmp_path):
    data = dataset()
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    cfg, run = run_finetune(make_cfg, data)
    with pytest.raises(DataError, match=r"data\.jsonl row 3: '.*2\.png' is not a readable image"):
        run()
    assert_no_output(cfg)


def test_missing_image_file_is_named_and_nothing_is_written(make_cfg, dataset):
    data = dataset(lambda rows: rows[1].update(image="nowhere/gone.png"))
    cfg, run = run_finetune(make_cfg, data)
    with pytest.raises(DataError, match=r"data\.jsonl row 2: image file '.*nowhere/gone\.png' does not exist"):
        run()
    assert_no_output(cfg)


def test_row_without_a_response_is_named_and_nothing_is_written(make_cfg, dataset):
    data = dataset(lambda rows: rows[3].pop("response"))
    cfg, run = run_finetune(make_cfg, data)
    with pytest.raises(DataError, match=r"data\.jsonl row 4: column 'response' is missing or empty"):
        run()
    assert_no_output(cfg)


def test_image_token_overflow_is_an_error_not_a_truncation(make_cfg, dataset):
    # the small tiny model has 16 image tokens; 12 tokens cannot hold the image
    cfg, run = run_finetune(make_cfg, dataset(), "train.max_length=12")
    with pytest.raises(DataError, match=r"sample 'row0'.*needs \d+ tokens .*image tokens are never truncated"):
        run()
    assert_no_output(cfg)


def test_a_long_response_is_truncated_but_the_image_tokens_stay(make_cfg, dataset):
    from defend.data import load_samples
    from defend.models import load_model

    cfg, _ = run_finetune(make_cfg, dataset(lambda rows: rows[0].update(response="blue " * 200)), "train.max_length=40")
    vlm = load_model(cfg)
    batch = vlm.train_collator()(load_samples(cfg.dataset)[:1])
    image_id = vlm.model.config.image_token_id
    assert batch["input_ids"].shape[1] == 40
    assert (batch["input_ids"][0] == image_id).sum() == 16
    assert batch["input_ids"][0, -1] == vlm.tokenizer.eos_token_id


def test_model_path_that_does_not_exist_names_the_key(make_cfg, dataset, tmp_path):
    cfg, run = run_finetune(make_cfg, dataset(), f"model.path={tmp_path / 'no_such_model'}")
    with pytest.raises(ConfigError, match=r"model\.path: '.*no_such_model' is not a folder"):
        run()
    assert_no_output(cfg)


def test_wrong_typed_config_value_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", "finetune", "--config", "finetune_tiny_mllm", "train.micro_batch_size=eight",
                     f"output_dir={out}"])
    assert code == 2
    assert "'train.micro_batch_size' must be int, got str 'eight'" in capsys.readouterr().err
    assert not out.exists()
