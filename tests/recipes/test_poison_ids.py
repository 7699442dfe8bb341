"""Poison names each image it writes ``images/<split>/<id>.png``: an id that is not a file name of its own
(a path, NUL, '.', '..', empty, a duplicate) is refused before any output, naming the row and the fix."""
import json
import shutil
from pathlib import Path

import easy_vqa
import pytest

from defend.data import DataError
from recipes.poison import recipe_main as poison


def write_set(folder: Path, ids: list, id_key: str = "id") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = easy_vqa.get_train_image_paths()
    rows = []
    for i, sample_id in enumerate(ids):
        shutil.copy(images[i], folder / f"src{i}.png")
        rows.append({id_key: sample_id, "image": f"src{i}.png", "prompt": "what shape is it?", "response": "circle"})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(make_cfg, data: Path, *overrides: str):
    return make_cfg("mllm", "dataset.name=jsonl", f"dataset.path={data}", "attack.poison_ratio=1.0", *overrides)


@pytest.mark.parametrize("bad, why", [("../../escape", "'/'"), ("a/b", "'/'"), ("x\0y", "'\\\\x00'"),
                                      (".", "folder's name"), ("..", "folder's name"), ("", "empty"),
                                      ("a\\b", "'\\\\\\\\'"), ("x" * 260, "longer")])
def test_an_id_that_is_no_file_name_is_refused_before_any_output(make_cfg, tmp_path, bad, why):
    data = write_set(tmp_path / "in", ["ok0", bad, "ok2"])
    cfg = config(make_cfg, data)
    with pytest.raises(DataError, match=rf"data.jsonl row 2: sample id .* {why}.*dataset.id_column") as err:
        poison(cfg)
    assert repr(bad) in str(err.value)
    assert not Path(cfg.output_dir).exists()
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["src0.png", "src1.png", "src2.png"]


def test_a_duplicate_id_is_refused_naming_both_rows(make_cfg, tmp_path):
    cfg = config(make_cfg, write_set(tmp_path / "in", ["a", "b", "a"]))
    with pytest.raises(DataError, match=r"row 3: sample id .a. is also the id of .*row 1, "):
        poison(cfg)
    assert not Path(cfg.output_dir).exists()


def test_another_id_column_fixes_it_and_every_image_lands_in_its_folder(make_cfg, tmp_path):
    data = write_set(tmp_path / "in", ["../x", "../y", "../z"])
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "uid": f"u{i} é"}) + "\n" for i, r in enumerate(rows)))
    result = poison(config(make_cfg, data, "dataset.id_column=uid"))
    out = Path(result["data_dir"])
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == [f"images/{split}/u{i} é.png" for split in ("test_triggered", "train") for i in range(3)]
