"""The loss log a resumed run trims: a last line torn by a kill mid-write is dropped with a warning (and
the run resumes); a bad line before it is corruption, refused naming the file and the line."""
import json
import logging

import pytest

from defend.data.samples import DataError
from defend.engine.loop import keep_log_until, read_train_log
from tests.distributed.runs import finetune, losses


def records(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.01, "elapsed_s": 0.1 * s}) + "\n" for s in steps)


@pytest.mark.parametrize("torn", ['{"step": 4, "loss": 0.2', '{"st', "\0\0\0\0", '{"step": 4, "loss": 0.25, "lr": 0.0'])
def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog, torn):
    path = tmp_path / "train_log.jsonl"
    path.write_text(records(1, 2, 3) + torn)
    with caplog.at_level(logging.WARNING):
        keep_log_until(path, 3, logging.getLogger("test"))
    assert path.read_text() == records(1, 2, 3)
    assert f"{path} line 4: dropped the last record" in caplog.text


def test_records_after_the_resumed_step_go_and_a_whole_last_record_without_newline_stays(tmp_path):
    path = tmp_path / "train_log.jsonl"
    path.write_text(records(1, 2, 3, 4).rstrip("\n"))
    assert [r["step"] for r in read_train_log(path)] == [1, 2, 3, 4]
    keep_log_until(path, 2)
    assert path.read_text() == records(1, 2)


@pytest.mark.parametrize("bad", ['{"step": 2, "lo', "[1, 2]", '{"loss": 0.5}', "\xff\xfe garbage"])
def test_a_bad_line_before_the_last_is_corruption_naming_file_and_line(tmp_path, bad):
    path = tmp_path / "train_log.jsonl"
    path.write_text(records(1) + bad + "\n" + records(3))
    with pytest.raises(DataError, match=rf"^{path} line 2: not a loss record .*Delete or repair that line"):
        keep_log_until(path, 3)
    assert path.read_text() == records(1) + bad + "\n" + records(3)  # left as it was
    path.write_text(records(1, 2) + bad + "\n")  # the last line, but whole (newline written): not torn
    with pytest.raises(DataError, match=rf"^{path} line 3: "):
        keep_log_until(path, 3)


def test_a_run_killed_mid_record_resumes_and_logs_every_step_once(tmp_path):
    out = tmp_path / "run"
    steps = ["train.max_steps=4", "train.save_every=2", "train.keep_checkpoints=2"]
    finetune(out, *steps)
    reference = losses(out)
    log = out / "train_log.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "loss": 0.7')  # what a kill while appending leaves
    finetune(out, *steps, f"train.resume={out / 'checkpoints' / 'step_000002'}")
    assert list(losses(out)) == [1, 2, 3, 4]
    for step, loss in reference.items():
        assert losses(out)[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert "line 5: dropped the last record" in (out / "finetune.log").read_text()
