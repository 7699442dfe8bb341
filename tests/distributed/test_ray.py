"""The Ray launcher on real Ray: an embedded local cluster, and a cluster that is too small.
(Submitting to a running head: tests/cluster/test_ray_submit.py.)"""
import sys
import time
from pathlib import Path

import pytest

from launchers.ray_train import ensure_local_ray_config
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


def test_a_cluster_too_small_fails_in_bounded_time_naming_the_missing_resources(tmp_path):
    started = time.monotonic()
    done = finetune(tmp_path / "run", "launcher=ray", "nproc=3", "ray.cpus_per_worker=1",
                    "ray.placement_timeout_s=5", check=False, timeout=200)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "cannot place 3 workers of {'CPU': 1.0}" in done.stderr and "Lower nproc" in done.stderr
    assert time.monotonic() - started < 120
