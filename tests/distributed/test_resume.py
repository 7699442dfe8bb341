"""Checkpoints and exact resume: a killed or signalled run, started again, ends with the losses of
the run that was never interrupted."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.distributed.runs import SMALL_RUN, finetune, losses

STEPS = ["train.max_steps=8", "train.save_every=2", "train.keep_checkpoints=2"]


def start_finetune(out: Path, *overrides: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "defend.cli", "run", "finetune", "--config", "finetune_tiny_mllm", *SMALL_RUN,
               f"output_dir={out}", *overrides]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"run ended before {path} appeared:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)


def assert_same_losses(resumed: dict, reference: dict) -> None:
    assert list(resumed) == list(reference)
    for step, loss in reference.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


@pytest.mark.parametrize("family", ["mllm", "mdlm"])
def test_resume_from_a_checkpoint_repeats_the_uninterrupted_losses(tmp_path, family):
    # the diffusion loss draws its masks from the global RNG: only a restored RNG gives equal losses
    reference = tmp_path / "reference"
    finetune(reference, *STEPS, f"model.family={family}")
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == ["step_000006", "step_000008"]  # rotation kept the newest 2
    resumed = tmp_path / "resumed"
    finetune(resumed, *STEPS, f"model.family={family}", f"train.resume={reference / 'checkpoints' / 'step_000006'}")
    new = losses(resumed)
    assert list(new) == [7, 8]  # started after step 6, not from scratch
    assert_same_losses(new, {s: v for s, v in losses(reference).items() if s > 6})


def test_sigterm_saves_and_stops_and_a_rerun_finishes_like_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    finetune(reference, "train.max_steps=30", "train.keep_checkpoints=1")
    out = tmp_path / "run"
    run = start_finetune(out, "train.max_steps=30", "train.keep_checkpoints=1")
    wait_for(out / "train_log.jsonl", run)  # training has started
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 75, stderr[-3000:]
    assert "SIGTERM received: stopped after step" in stderr
    state = json.loads(next((out / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert 0 < state["step"] < 30 and not (out / "adapter").exists()
    finetune(out, "train.max_steps=30", "train.keep_checkpoints=1")  # the same command again
    assert_same_losses(losses(out), losses(reference))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_killed_zero3_run_on_2_ranks_resumes_with_the_uninterrupted_losses(tmp_path):
    two = ["launcher=torchrun", "nproc=2", "deepspeed=zero3", "train.max_steps=10", "train.save_every=3"]
    reference = tmp_path / "reference"
    finetune(reference, *two)
    out = tmp_path / "run"
    run = start_finetune(out, *two)
    wait_for(out / "checkpoints" / "step_000003" / "trainer_state.json", run, timeout=240)
    for process in [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]:
        process.kill()  # every rank at once, no chance to save anything
    run.wait(timeout=60)
    assert not (out / "adapter").exists()
    finetune(out, *two)  # train.resume=auto: the newest complete checkpoint
    assert "resumed at step" in (out / "finetune.log").read_text()
    assert_same_losses(losses(out), losses(reference))


def test_resuming_with_another_world_size_fails_clearly(tmp_path):
    out = tmp_path / "run"
    finetune(out, "launcher=torchrun", "nproc=2", "deepspeed=zero2", "train.max_steps=2", "train.save_every=2")
    done = finetune(out, "train.max_steps=4", "deepspeed=zero2", check=False)
    assert done.returncode == 2
    assert "written by 2 ranks and this run has 1" in done.stderr and "nproc=2" in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_either_stop_signal_is_recorded_and_the_old_handler_restored(sig):
    from defend.engine.preemption import StopRequest

    before = signal.getsignal(sig)
    stop = StopRequest()
    assert not stop.requested()
    signal.raise_signal(sig)
    assert stop.requested() and stop.received == sig.name
    stop.close()
    assert signal.getsignal(sig) == before
