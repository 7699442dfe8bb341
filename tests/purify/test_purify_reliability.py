"""Purification that always finishes with a verifiable output, or stops before any compute naming the
row: ids of any column (or none), duplicates found first, every bad row kind quarantined, each shard
checked against its record (torn, truncated, corrupt, changed input), bounded retries."""
import json
from pathlib import Path

import pytest
from PIL import Image

from defend.config import ConfigError, load_config
from defend.data import load_samples
from defend.purify.blocks import plan_blocks, read_block, record_path, shard_path, verify_block
from tests.conftest import TINY_TEST_OVERRIDES


def rows(n: int) -> list[dict]:
    samples = load_samples(load_config(None, ["dataset.split=test", f"dataset.max_samples={n}"]).dataset)
    return [{"id": s.id, "image": str(s.image), "prompt": s.prompt, "response": s.response} for s in samples]


def write(path: Path, lines: list) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return path


def config(source: Path, out: Path, *extra: str):
    return load_config("purify_tiny_mllm", [*TINY_TEST_OVERRIDES, f"dataset.path={source}", f"output_dir={out}",
                                            "purify.block_size=3", "purify.batch_size=3", "eval.max_new_tokens=2",
                                            *extra])


def test_duplicate_ids_are_refused_before_any_compute_naming_both_lines(tmp_path):
    from recipes.purify import recipe_main

    good = rows(3)
    source = write(tmp_path / "in.jsonl", [*good, {**good[0], "prompt": "again?"}])
    with pytest.raises(ConfigError, match="lines 1 and 4 have the same id"):
        recipe_main(config(source, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    renamed = write(tmp_path / "uid.jsonl", [{**r, "uid": f"u{i}"} for i, r in enumerate([*good, good[0]])])
    assert len(plan_blocks(renamed, 3, id_column="uid")) == 2  # unique in the column that is named


def test_every_kind_of_bad_row_is_quarantined_and_a_u2028_row_stays_one_row(tmp_path):
    good = rows(2)
    bomb = tmp_path / "bomb.png"
    Image.new("L", (14000, 14000)).save(bomb)  # > 2 x PIL's MAX_IMAGE_PIXELS: a decompression bomb
    source = write(tmp_path / "in.jsonl", [
        {**good[0], "prompt": good[0]["prompt"] + "\u2028 and\u2029 more"},
        b'{"id": "latin1", "prompt": "caf\xe9?", "response": "x"}',
        [1, 2, 3],
        {**good[1], "id": "bomb", "image": str(bomb)},
        good[1]])
    (block,) = plan_blocks(source, 10)
    assert block.rows == 5
    cfg = config(source, tmp_path / "out")
    usable, bad = read_block(cfg, source, block)
    assert [s.id for _, s in usable] == [good[0]["id"], good[1]["id"]]
    assert "\u2028" in usable[0][1].prompt
    reasons = [b["reason"] for b in bad]
    assert "not UTF-8" in reasons[0] and "a JSON list, not an object" in reasons[1] and "bomb.png" in reasons[2]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A purification of 6 id-less rows (ids are their line numbers) under dataset.id_column=id."""
    from recipes.purify import recipe_main

    tmp = tmp_path_factory.mktemp("purify")
    source = write(tmp / "in.jsonl", [{k: v for k, v in r.items() if k != "id"} for r in rows(6)])
    summary = recipe_main(config(source, tmp / "out"))
    return source, tmp / "out", summary


def test_rows_without_ids_get_their_line_numbers_and_the_run_finishes(finished):
    source, out, summary = finished
    written = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert summary["rows"] == 6 and [r["id"] for r in written] == ["1", "2", "3", "4", "5", "6"]
    records = [json.loads(record_path(out, b).read_text()) for b in (0, 1)]
    assert [(r["input_rows"], r["rows"], r["quarantined"]) for r in records] == [(3, 3, 0), (3, 3, 0)]


def test_a_torn_truncated_or_corrupt_shard_is_refused_by_name_and_redone_on_resume(finished, tmp_path):
    import shutil

    from recipes.purify import assemble

    source, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    blocks = plan_blocks(source, 3)
    assert [verify_block(copy, b) for b in blocks] == [None, None]
    shard = shard_path(copy, 1)
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated
    assert "does not match its record" in verify_block(copy, blocks[1])
    with pytest.raises(ConfigError, match="part-000001.jsonl: .*does not match its record"):
        assemble(copy, blocks, {"source": str(source)}, "id")
    record_path(copy, 0).write_text('{"block": 0, "rows"')  # torn record
    assert "torn" in verify_block(copy, blocks[0])
    record_path(copy, 0).unlink()
    assert verify_block(copy, blocks[0]) == "not finished"
    edited = source.read_text().splitlines()
    edited[4] = edited[4].replace('"prompt": "', '"prompt": "now: ')
    changed = write(tmp_path / "edited.jsonl", [line.encode() for line in edited])
    assert [verify_block(out, b) for b in plan_blocks(changed, 3)] == [None, "its input rows changed"]


def test_a_merge_killed_midway_leaves_no_data_and_the_rerun_completes_it(finished, tmp_path):
    """SIGKILL inside the merge, after train.jsonl is written and before the manifest: no data/ appears
    (the merge writes a temp folder swapped in whole), the next merge clears the killed one's temp
    folder and writes data/ that its manifest verifies."""
    import multiprocessing
    import os
    import shutil
    import signal

    import recipes.purify as purify
    from defend.data.manifest import verify_data_folder

    source, out, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "data")
    blocks = plan_blocks(source, 3)

    def killed_at_the_manifest():
        purify.write_json = lambda path, data: os.kill(os.getpid(), signal.SIGKILL)
        purify.assemble(copy, blocks, {"source": str(source)}, "id")

    child = multiprocessing.get_context("fork").Process(target=killed_at_the_manifest)
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    left = list(copy.glob(".data.*.tmp"))
    assert not (copy / "data").exists() and len(left) == 1 and (left[0] / "train.jsonl").is_file()
    purify.assemble(copy, blocks, {"source": str(source)}, "id")
    assert not list(copy.glob(".data.*.tmp"))
    verify_data_folder(copy / "data", "purify output", uses=["train.jsonl"])
    assert (copy / "data" / "train.jsonl").read_bytes() == (out / "data" / "train.jsonl").read_bytes()


def test_no_usable_row_and_an_empty_input_fail_instead_of_writing_empty_sets(tmp_path):
    from recipes.purify import recipe_main

    empty = write(tmp_path / "empty.jsonl", [])
    with pytest.raises(ConfigError, match="has no rows"):
        recipe_main(config(empty, tmp_path / "o1"))
    bad = write(tmp_path / "bad.jsonl", [b"{nope", [1]])
    with pytest.raises(ConfigError, match="no usable row \\(2 quarantined"):
        recipe_main(config(bad, tmp_path / "o2", "purify.retries=0"))
    assert not (tmp_path / "o2" / "data").exists()


def test_a_block_that_keeps_failing_stops_the_run_after_its_retries_naming_it(tmp_path):
    from defend.purify.ray_pool import BlockFailed
    from recipes.purify import recipe_main

    good = rows(3)
    long = {**good[2], "prompt": "what shape is it? " * 40}  # cannot fit train.max_length 64
    source = write(tmp_path / "in.jsonl", [*good[:2], long])
    with pytest.raises(BlockFailed, match="after 1 retries: purify block 0 \\(input lines 1-.*train.max_length"):
        recipe_main(config(source, tmp_path / "out", "purify.retries=1"))
    assert not (tmp_path / "out" / "data").exists()
