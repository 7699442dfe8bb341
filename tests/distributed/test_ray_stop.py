"""Preemption under Ray Train: a stop signal to the driver reaches the training loop of every worker,
which saves and stops; the same command resumes and ends like a run that was never stopped."""
import json
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from defend.engine.ray_env import ensure_local_ray_config
from tests.distributed.runs import finetune, losses
from tests.distributed.test_resume import assert_same_losses, start_finetune

# 2 ranks; a step takes ~40 ms here: enough steps that the stop lands mid-run (without the stop
# reaching the workers, 24 steps ended before it)
STEPS = 150
TWO = ["nproc=2", "deepspeed=zero2", f"train.max_steps={STEPS}", "train.keep_checkpoints=1"]


def wait_for_step(out: Path, step: int, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    log = out / "train_log.jsonl"
    while not (log.exists() and any(json.loads(line)["step"] >= step for line in log.read_text().splitlines()
                                    if line.endswith("}"))):
        assert process.poll() is None, f"the run ended before step {step}:\n{process.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} in {log} after {timeout}s"
        time.sleep(0.05)


def test_sigterm_to_the_ray_driver_checkpoints_every_worker_and_the_rerun_equals_the_uninterrupted_run(tmp_path):
    sig = signal.SIGTERM  # as Slurm's warning (run_requeueable) and `ray job stop` deliver it
    ensure_local_ray_config()
    reference = tmp_path / "reference"  # torchrun's 2 ranks train exactly as Ray's (tests/distributed/test_ray.py)
    finetune(reference, "launcher=torchrun", *TWO)
    out = tmp_path / "run"
    run = start_finetune(out, "launcher=ray", *TWO)
    wait_for_step(out, 3, run)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=240)
    assert run.returncode == 75, stderr[-4000:]
    assert f"{sig.name} received: stopped after step" in stderr
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert 3 <= state["step"] < STEPS and state["world_size"] == 2
    assert (checkpoint / "rng_rank0.pt").is_file() and (checkpoint / "rng_rank1.pt").is_file()  # both workers saved
    assert not (out / "adapter").exists()
    assert max(losses(out)) == state["step"]  # it stopped at the step it saved

    finetune(out, "launcher=ray", *TWO, timeout=400)  # the same command again: train.resume=auto
    assert f"resumed at step {state['step']}" in (out / "finetune.log").read_text()
    assert_same_losses(losses(out), losses(reference))
    final, expected = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (out, reference))
    assert final.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


def test_a_stop_source_counts_as_a_received_signal_while_it_is_installed():
    from defend.engine.preemption import StopRequest, stop_source

    asked = []
    with stop_source(lambda: asked.append(1) or ("SIGTERM" if len(asked) > 1 else None)):
        stop = StopRequest(signals=())
        assert not stop.requested()  # nothing yet
        assert stop.requested() and stop.received == "SIGTERM"
        assert stop.requested() and len(asked) == 2  # once received, not asked again
    assert not StopRequest(signals=()).requested()  # uninstalled
