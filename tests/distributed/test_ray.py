"""The Ray launcher on real Ray: an embedded local cluster, a cluster that is too small, and a
`ray job submit` to a head started with `ray start` on loopback."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from defend.engine.distributed import free_port
from launchers.ray_train import ensure_local_ray_config
from tests.distributed.runs import SMALL_RUN, finetune, losses

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(autouse=True, scope="module")
def local_ray():
    ensure_local_ray_config()  # before any Ray starts: no cloud-metadata probe


def test_two_ray_workers_train_like_torchrun(tmp_path):
    common = ["nproc=2", "deepspeed=zero2", "train.max_steps=2"]
    finetune(tmp_path / "torchrun", "launcher=torchrun", *common)
    finetune(tmp_path / "ray", "launcher=ray", *common, timeout=400)
    assert list(losses(tmp_path / "ray")) == [1, 2]
    for step, loss in losses(tmp_path / "torchrun").items():
        assert losses(tmp_path / "ray")[step] == pytest.approx(loss, rel=1e-5)
    assert (tmp_path / "ray" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_cluster_too_small_fails_in_bounded_time_naming_the_missing_resources(tmp_path):
    started = time.monotonic()
    done = finetune(tmp_path / "run", "launcher=ray", "nproc=3", "ray.cpus_per_worker=1",
                    "ray.placement_timeout_s=5", check=False, timeout=200)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot place 3 workers of {'CPU': 1.0}" in done.stderr and "Lower nproc" in done.stderr
    assert time.monotonic() - started < 120


# Ray >= 2.5x starts local clusters with token authentication (token in ~/.ray/auth_token); the
# head and the job client must both be in token mode
RAY_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


@pytest.fixture
def ray_head():
    port, dashboard = free_port(), free_port()
    env = RAY_ENV
    start = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats"]
    subprocess.run(start, check=True, capture_output=True, timeout=120, env=env)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120, env=RAY_ENV)


def test_ray_job_submit_runs_a_recipe_on_a_running_head(tmp_path, ray_head):
    out = tmp_path / "run"
    env_vars = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "OMP_NUM_THREADS", "DEFEND_CACHE", "TOKENIZERS_PARALLELISM")}
    entrypoint = [sys.executable, "-m", "defend.cli", "run", "finetune", "--config", "finetune_tiny_mllm", *SMALL_RUN,
                  "launcher=ray", "nproc=2", "ray.address=auto", "train.max_steps=2", f"output_dir={out}"]
    done = subprocess.run([RAY, "job", "submit", f"--address={ray_head}", f"--runtime-env-json={json.dumps({'env_vars': env_vars})}",
                           "--", *entrypoint], capture_output=True, text=True, timeout=400, env=RAY_ENV)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert list(losses(out)) == [1, 2] and (out / "adapter" / "adapter_config.json").is_file()
