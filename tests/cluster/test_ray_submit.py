"""`defend submit ray` to a real Ray head (`ray start --head`, dashboard on 127.0.0.1): a copied
recipe and config travel in the working dir, logs stream back, the exit status is the job's, and
a stopped training job saves before it ends."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defend.engine.ray_env import ensure_local_ray_config
from tests.cluster.ray_head import RAY, own_ray_head
from tests.distributed.runs import SMALL_RUN, losses

# Ray >= 2.5x starts local clusters with token authentication (token in ~/.ray/auth_token); the
# head and the job client must both be in token mode
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


@pytest.fixture(scope="module")
def ray_head(defend_cache):
    """This module's own head (own temp dir and ports), stopped by PID: any other Ray here keeps running."""
    ensure_local_ray_config()  # before any Ray starts: no cloud-metadata probe
    with own_ray_head({**RAY_ENV, "DEFEND_CACHE": str(defend_cache)}, num_cpus=2) as head:
        yield head.job_api


def submit(cwd: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``defend submit ray``; the head runs this interpreter (a cluster's would be its own: ray.job_python)."""
    return subprocess.run([sys.executable, "-m", "defend.cli", "submit", "ray", *args, f"ray.job_python={sys.executable}"],
                          capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=RAY_ENV)


def test_a_copied_recipe_runs_on_the_head_as_2_ray_train_workers_and_its_logs_stream_back(ray_head, tmp_path):
    project = tmp_path / "project"  # a user's folder: their copy of the recipe and config
    project.mkdir()
    shutil.copy(Path(__file__).parents[2] / "recipes" / "finetune.py", project / "my_finetune.py")
    shutil.copy(Path(__file__).parents[2] / "recipes" / "configs" / "finetune_tiny_mllm.yaml", project / "my.yaml")
    out = tmp_path / "run"
    done = submit(project, "my_finetune.py", "--config", "my.yaml", *SMALL_RUN, "launcher=ray", "nproc=2",
                  "train.max_steps=2", f"output_dir={out}", f"ray.address={ray_head}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted Ray job" in done.stdout and "step 2/2" in done.stdout  # the job's log, streamed
    assert list(losses(out)) == [1, 2] and (out / "adapter" / "adapter_config.json").is_file()


def test_a_failing_job_returns_its_exit_status_and_bad_submissions_fail_before_submitting(ray_head, tmp_path):
    failing = submit(tmp_path, "finetune", "--config", "finetune_tiny_mllm", *SMALL_RUN, "dataset.name=jsonl",
                     f"dataset.path={tmp_path / 'missing.jsonl'}", f"output_dir={tmp_path / 'run'}",
                     f"ray.address={ray_head}")
    assert failing.returncode == 2, failing.stdout[-3000:]  # defend's exit status for a data error
    assert "missing.jsonl" in failing.stdout and "failed" in failing.stdout

    relative = submit(tmp_path, "finetune", "--config", "finetune_tiny_mllm", "output_dir=runs/x",
                      f"ray.address={ray_head}")
    assert relative.returncode == 2 and "output_dir: 'runs/x' is relative" in relative.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "my.yaml").write_text("seed: 1\n")
    (tmp_path / "project").mkdir()
    away = submit(tmp_path / "project", "finetune", "--config", str(outside / "my.yaml"),
                  f"output_dir={tmp_path / 'run'}", f"ray.address={ray_head}")
    assert away.returncode == 2 and "outside ray.working_dir" in away.stderr
    no_api = submit(tmp_path, "finetune", "--config", "finetune_tiny_mllm", f"output_dir={tmp_path / 'run'}",
                    "ray.address=auto")
    assert no_api.returncode == 2 and "needs the cluster's job API" in no_api.stderr


def test_stopping_a_submitted_training_job_lets_the_driver_save_and_stop_instead_of_ray_killing_it(ray_head, tmp_path):
    """Ray's job supervisor SIGKILLs a stopped job's driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM
    (3 s by default); `defend submit ray` raises that, so the driver outlives its workers' save and exits."""
    out = tmp_path / "run"
    client = subprocess.Popen([sys.executable, "-m", "defend.cli", "submit", "ray", "finetune", "--config",
                               "finetune_tiny_mllm", *SMALL_RUN, "launcher=ray", "nproc=2", "train.max_steps=400",
                               f"output_dir={out}", f"ray.address={ray_head}", f"ray.job_python={sys.executable}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=RAY_ENV)
    deadline = time.monotonic() + 300
    while not ((out / "train_log.jsonl").is_file() and (out / "train_log.jsonl").read_text().count("\n") >= 2):
        assert client.poll() is None and time.monotonic() < deadline, client.communicate()[0][-3000:]
        time.sleep(0.05)
    client.send_signal(signal.SIGTERM)
    streamed, _ = client.communicate(timeout=300)
    assert client.returncode == 75, streamed[-3000:]
    (checkpoint,) = (out / "checkpoints").glob("step_*")
    step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    assert 2 <= step < 400 and not (out / "adapter").exists()
    job_id = re.search(r"submitted Ray job (\S+)", streamed).group(1)
    logs = subprocess.run([RAY, "job", "logs", job_id, f"--address={ray_head}"], capture_output=True, text=True,
                          timeout=120, env=RAY_ENV, check=False).stdout
    assert f"SIGTERM received: stopped after step {step}" in logs, logs[-3000:]  # the driver's own last words
