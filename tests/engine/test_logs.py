"""Logs fit for batch jobs: off a terminal, no bar, one line per train.log_every steps and a heartbeat for
evaluations; on a terminal, the bar; metrics to the reporters of train.report_to (TensorBoard, W&B).

The recipes run as `defend run` subprocesses, their output a pipe (as in a Slurm job) or a pseudo-terminal."""
import fcntl
import glob
import importlib.util
import json
import logging
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from defend.config import ConfigError, load_config
from defend.engine.reporting import Reporters
from defend.progress import Progress
from defend.validation import check_train_settings
from tests.conftest import TINY_TEST_OVERRIDES

HAVE_WANDB = importlib.util.find_spec("wandb") is not None
STEP_LINE = re.compile(r"step (\d+)/200 loss \d+\.\d{4} \(task \d+\.\d{4}( pcr_\w+ \d+\.\d{4})+\) lr \S+"
                       r" \| \S+ samples/s \S+ tokens/s \| elapsed \S+ ETA \S+$")
TERMS = ["loss", "lr", "task", "pcr_discrepancy", "pcr_entropy"]  # what a PCR run logs each log step


def defend_env(tmp):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
            "WANDB_CONFIG_DIR": str(tmp / "wandb_config"), "WANDB_CACHE_DIR": str(tmp / "wandb_cache")}


def defend_run(recipe, config, *overrides, tmp):
    """``defend run`` with stdout and stderr into one pipe (not a terminal); returns (rc, bytes)."""
    done = subprocess.run([sys.executable, "-m", "defend.cli", "run", recipe, "--config", config, *TINY_TEST_OVERRIDES,
                           *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                          env=defend_env(tmp), timeout=600)
    return done.returncode, done.stdout


@pytest.fixture(scope="module")
def run_200(tmp_path_factory, defend_cache):
    """A 200-step PCR fine-tune of the tiny model (micro batch 2), logged off a terminal, reporting to
    jsonl, TensorBoard and (when installed) W&B."""
    tmp = tmp_path_factory.mktemp("run_200")
    report_to = ["jsonl", "tensorboard"] + ["wandb"] * HAVE_WANDB
    rc, output = defend_run("finetune", "finetune_tiny_mllm", "train.max_steps=200", "train.micro_batch_size=2",
                            "train.log_every=10", "dataset.max_samples=64", "objective.name=pcr",
                            f"train.report_to=[{','.join(report_to)}]", f"output_dir={tmp / 'run'}", tmp=tmp)
    assert rc == 0, output.decode(errors="replace")[-3000:]
    records = [json.loads(line) for line in (tmp / "run" / "train_log.jsonl").read_text().splitlines()]
    return tmp / "run", output, records


def test_a_200_step_run_off_a_terminal_logs_a_line_per_log_step_in_under_20_kb(run_200):
    out, output, records = run_200
    text = output.decode()
    assert len(output) < 20_000, f"{len(output)} bytes:\n{text[-3000:]}"
    assert "\r" not in text, "a bar redraw in a non-terminal log"
    assert "Loading weights" not in text  # transformers' bar follows the same rule
    lines = [line.split("defend.finetune: ", 1)[1] for line in text.splitlines() if "defend.finetune: step " in line]
    assert [int(STEP_LINE.match(line).group(1)) for line in lines] == list(range(10, 201, 10)), "\n".join(lines)
    assert [r["step"] for r in records] == list(range(10, 201, 10))
    assert lines[-1].endswith("ETA 0s")
    first = records[0]
    assert lines[0].startswith(f"step 10/200 loss {first['loss']:.4f} (task {first['task']:.4f} pcr_discrepancy"
                               f" {first['pcr_discrepancy']:.4f} pcr_entropy {first['pcr_entropy']:.4f})"
                               f" lr {first['lr']:.2e} |")
    assert (out / "finetune.log").stat().st_size < 20_000


def test_the_tensorboard_event_file_holds_every_logged_term(run_200):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, records = run_200
    (events,) = glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    assert set(records[0]) == {"step", "elapsed_s", *TERMS}
    assert set(acc.Tags()["scalars"]) == {f"train/{term}" for term in TERMS}
    for term in TERMS:
        logged = acc.Scalars(f"train/{term}")
        assert [e.step for e in logged] == [r["step"] for r in records]
        assert [e.value for e in logged] == pytest.approx([r[term] for r in records], rel=1e-6, abs=1e-12)


def wandb_history(run_file):
    """The history rows of an offline W&B run file (LevelDB-style log records of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B"
    rows, pos, chunk, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or a record's last fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.skipif(not HAVE_WANDB, reason="wandb is not installed (pip install wandb)")
def test_the_offline_wandb_run_holds_every_logged_term(run_200):
    out, _, records = run_200
    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = wandb_history(run_file)
    assert [row["_step"] for row in rows] == [r["step"] for r in records]
    for term in TERMS:
        assert [row[f"train/{term}"] for row in rows] == pytest.approx([r[term] for r in records])


def test_an_evaluation_off_a_terminal_logs_a_heartbeat(tmp_path, defend_cache):
    rc, output = defend_run("evaluate", "evaluate_tiny_mllm", "eval.max_samples=160", "eval.batch_size=1",
                            "heartbeat_s=0.05", f"output_dir={tmp_path / 'eval'}", tmp=tmp_path)
    text = output.decode()
    assert rc == 0, text[-3000:]
    assert "\r" not in text
    beat = r"defend\.evaluate: evaluate clean: (\d+)/160 rows, \S+ rows/s, elapsed \S+, ETA \S+$"
    beats = re.findall(beat, text, re.M)
    assert len(beats) >= 3, text[-3000:]
    assert [int(b) for b in beats] == sorted(int(b) for b in beats)
    assert re.search(r"evaluate clean: 160/160 rows, .* \(done\)$", text, re.M)


def test_on_a_terminal_the_bar_is_drawn(tmp_path, defend_cache):
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal's size: tqdm's width
    proc = subprocess.Popen([sys.executable, "-m", "defend.cli", "run", "finetune", "--config", "finetune_tiny_mllm",
                             *TINY_TEST_OVERRIDES, "train.max_steps=20", "train.micro_batch_size=2",
                             "dataset.max_samples=16", f"output_dir={tmp_path / 'run'}"],
                            stdin=terminal, stdout=terminal, stderr=terminal, env=defend_env(tmp_path))
    os.close(terminal)
    output, deadline = b"", time.monotonic() + 600
    while time.monotonic() < deadline:
        if select.select([controller], [], [], 1.0)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(controller)
    assert proc.wait(timeout=60) == 0, output.decode(errors="replace")[-3000:]
    text = output.decode(errors="replace")
    assert "\r" in text and re.search(r"finetune: 100%\|.*\| 20/20", text), text[-3000:]


def test_a_heartbeat_comes_while_one_item_is_still_running(caplog):
    log = logging.getLogger("test.heartbeat")
    with caplog.at_level(logging.INFO, logger="test.heartbeat"):
        with Progress(4, "purify", unit="rows", every_s=0.05, log=log, bar=False) as progress:
            progress.update(1)
            time.sleep(0.4)  # a block that takes longer than the interval
    beats = [r.getMessage() for r in caplog.records]
    assert len([b for b in beats if b.startswith("purify: 1/4 rows, ")]) >= 3, beats
    assert beats[-1].startswith("purify: 1/4 rows") and beats[-1].endswith("(stopped)")


def test_no_bar_and_no_heartbeat_when_disabled(caplog, capsys):
    with caplog.at_level(logging.INFO):
        with Progress(2, "rank 1", every_s=0.01, enabled=False) as progress:
            progress.update(2)
            time.sleep(0.05)
    assert caplog.records == [] and capsys.readouterr().err == ""


def test_report_to_names_are_checked_before_a_run():
    check_train_settings(load_config("finetune_tiny_mllm", ["train.report_to=[jsonl,tensorboard]"]))
    check_train_settings(load_config("finetune_tiny_mllm", ["train.report_to=none"]))
    with pytest.raises(ConfigError, match="unknown reporter 'tensorbord'.*jsonl.*tensorboard.*wandb"):
        check_train_settings(load_config("finetune_tiny_mllm", ["train.report_to=[jsonl,tensorbord]"]))


def test_without_jsonl_in_report_to_no_train_log_is_written(tmp_path):
    reporters = Reporters(["tensorboard"], tmp_path / "train_log.jsonl")
    reporters.log({"step": 1, "loss": 0.5, "lr": 0.1, "elapsed_s": 1.0})
    reporters.close()
    assert not (tmp_path / "train_log.jsonl").exists() and list((tmp_path / "tensorboard").iterdir())
