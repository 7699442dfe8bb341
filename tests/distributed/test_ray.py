"""The Ray launcher on real Ray: an embedded local cluster, and a cluster that is too small.
(Submitting to a running head: tests/cluster/test_ray_submit.py.)"""
import sys
import time
from pathlib import Path

import pytest

from defend.engine.ray_env import ensure_local_ray_config
from tests.distributed.runs import finetune, losses

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


def test_an_embedded_ray_too_small_for_nproc_is_refused_before_ray_starts(tmp_path):
    """nproc x ray.cpus_per_worker above this machine's cores: defend validate's check, before any work."""
    import os

    started = time.monotonic()
    nproc = (os.cpu_count() or 1) + 1
    done = finetune(tmp_path / "run", "launcher=ray", f"nproc={nproc}", "ray.cpus_per_worker=1", check=False, timeout=200)
    assert done.returncode == 2, done.stderr[-3000:]
    assert f"nproc: launcher=ray with nproc={nproc}" in done.stderr and "ray.address=auto" in done.stderr
    assert not (tmp_path / "run").exists() and time.monotonic() - started < 60


def test_a_cluster_too_small_fails_in_bounded_time_naming_the_missing_resources():
    """Where validate cannot know the cluster (ray.address): the placement wait, on a real 2-CPU Ray."""
    import ray

    from defend.config import ConfigError, load_config
    from launchers.ray_train import wait_for_placement

    cfg = load_config(None, ["launcher=ray", "nproc=3", "ray.cpus_per_worker=1", "ray.placement_timeout_s=5"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        started = time.monotonic()
        with pytest.raises(ConfigError, match=r"cannot place 3 workers of \{'CPU': 1.0\}.*Lower nproc"):
            wait_for_placement(cfg)
        assert time.monotonic() - started < 30
    finally:
        ray.shutdown()
