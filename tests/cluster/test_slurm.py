"""`defend submit slurm` against a real Slurm on this machine: a 2-node ZeRO-3 LoRA fine-tune, a
Ray-on-Slurm purification on 2 nodes, and a preemption (warning signal -> checkpoint -> requeue ->
resumed run with the uninterrupted run's losses)."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from defend.config import load_config
from tests.cluster.conftest import HERE, job_state, slurm_up, wait_job
from tests.distributed.runs import SMALL_RUN, losses
from tests.purify.test_purify_recipe import purify_args, write_input


def submit(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "defend.cli", "submit", "slurm", *args], capture_output=True,
                          text=True, timeout=timeout)


def log_of(out: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((out / "slurm").glob("slurm-*.out")))


def ray_daemons(port: int | None = None) -> list[int]:
    """Ray's node daemons on this machine; with ``port``, only those of the cluster whose GCS listens there
    (another test's or a user's Ray may run beside a test: it is not this job's to end)."""
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] in ("raylet", "gcs_server") and (port is None or any(
                arg.endswith(f":{port}") or arg.endswith(f"={port}") for arg in p.info["cmdline"] or ())):
            found.append(p.pid)
    return found


def job_ray_port(out: Path) -> int:
    """The GCS port slurm/lib/ray_cluster.sh derives from the job id (its log: slurm-<id>.out)."""
    (log,) = (out / "slurm").glob("slurm-*.out")
    return 20000 + (int(re.fullmatch(r"slurm-(\d+)\.out", log.name).group(1)) % 400) * 100


def test_slurm_up_brings_up_one_node_and_down_leaves_no_daemon(tmp_path):
    env = slurm_up(tmp_path / "one", 1)
    pids = [int(line.split()[1]) for line in (tmp_path / "one" / "pids").read_text().splitlines()]
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True).stdout
        assert nodes.split() == ["n1", "idle"]
    finally:
        subprocess.run([str(HERE / "slurm_down.sh"), str(tmp_path / "one")], timeout=60)
    assert len(pids) == 3 and not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    done = submit("finetune", "--config", "finetune_tiny_mllm", "--dry-run", f"output_dir={out}", "slurm.nodes=3",
                  "slurm.gpus_per_node=4", "slurm.partition=gpu", "slurm.sbatch_args=[--qos=high]")
    assert done.returncode == 0, done.stderr[-2000:]
    script = done.stdout
    for line in ("#SBATCH --nodes=3", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --qos=high",
                 "#SBATCH --signal=B:USR1@300", "--nproc_per_node=4", f"--config {out}/slurm/config.yaml"):
        assert line in script, line
    assert "#SBATCH --account" not in script and not out.exists()
    purify = submit("purify", "--config", "purify_tiny_mllm", "--dry-run", f"output_dir={out}")
    assert "ray_up" in purify.stdout and "submit ray purify" in purify.stdout
    bad = submit("finetune", "--config", "finetune_tiny_mllm", "--dry-run", "slurm.template=nope")
    assert bad.returncode == 2 and "slurm.template: 'nope'" in bad.stderr


def test_a_2_node_zero3_lora_finetune_completes_and_its_adapter_loads(slurm, tmp_path):
    out = tmp_path / "run"
    done = submit("finetune", "--config", "finetune_tiny_mllm", "--wait", *SMALL_RUN, "slurm.nodes=2",
                  "deepspeed=zero3", "train.max_steps=4", f"output_dir={out}")
    assert done.returncode == 0, log_of(out)[-4000:]
    log = log_of(out)
    assert "2 node(s) x 1 rank(s), rendezvous 127.0.0.1:" in log
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and len(summary["peak_memory_mb_per_rank"]) == 2  # 2 ranks, one per node
    assert list(losses(out)) == [1, 2, 3, 4]
    assert (out / "slurm" / "finetune.sbatch").is_file()  # can be re-submitted by hand

    from peft import PeftModel

    from defend.data import load_samples
    from defend.models import load_model

    cfg = load_config(str(out / "config.yaml"), [f"model.adapter={out / 'adapter'}"])
    tuned = load_model(cfg)
    assert isinstance(tuned.model, PeftModel)
    base = load_model(load_config(str(out / "config.yaml")))
    inputs = tuned.model_inputs(tuned.train_collator()(load_samples(cfg.dataset)[:4]))
    with torch.no_grad():
        assert not torch.allclose(tuned.model.eval()(**inputs).logits, base.model.eval()(**inputs).logits, atol=1e-4)


def test_ray_on_slurm_purifies_on_2_nodes_like_a_local_run_and_leaves_no_ray_behind(slurm, tmp_path):
    source, ids = write_input(tmp_path)
    local = subprocess.run([sys.executable, "-m", "defend.cli", *purify_args(source, tmp_path / "local")],
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    out = tmp_path / "slurm"
    args = purify_args(source, out)[2:]  # drop "run purify"
    done = submit("purify", *args, "--wait", "slurm.nodes=2")
    log = log_of(out)
    assert done.returncode == 0, log[-4000:]
    assert "Ray cluster up: 2 node(s)" in log and "purify.actors=2" in log
    rows = (out / "data" / "train.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in rows] == ids  # every row once, in input order
    assert rows == (tmp_path / "local" / "data" / "train.jsonl").read_text().splitlines()  # greedy: identical
    time.sleep(2)
    assert not ray_daemons(job_ray_port(out))  # the job's Ray nodes ended with it


def test_the_warning_signal_checkpoints_requeues_and_the_resumed_run_has_the_uninterrupted_losses(slurm, tmp_path):
    run = [*SMALL_RUN, "train.max_steps=300", "train.save_every=100", "train.keep_checkpoints=1"]
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-m", "defend.cli", "run", "finetune", "--config", "finetune_tiny_mllm", *run,
                    f"output_dir={reference}"], check=True, capture_output=True, timeout=300)
    out = tmp_path / "run"
    done = submit("finetune", "--config", "finetune_tiny_mllm", *run, f"output_dir={out}", "slurm.signal_seconds=60")
    assert done.returncode == 0, done.stderr[-3000:]
    job = re.search(r"submitted batch job (\d+)", done.stdout).group(1)
    deadline = time.monotonic() + 240
    while not (out / "train_log.jsonl").exists() or len((out / "train_log.jsonl").read_text().splitlines()) < 20:
        assert time.monotonic() < deadline and job_state(job)["JobState"] in ("PENDING", "RUNNING"), log_of(out)[-3000:]
        time.sleep(0.2)
    # what the scheduler sends slurm.signal_seconds before the time limit
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    state = wait_job(job)
    log = log_of(out)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", log[-4000:]
    stopped = int(re.search(r"stopped after step (\d+), checkpoint", log).group(1))
    assert 20 <= stopped < 300 and f"resumed at step {stopped} of 300" in (out / "finetune.log").read_text()
    resumed, expected = losses(out), losses(reference)
    assert list(resumed) == list(expected)
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
