"""A real Slurm (munged, slurmctld, two slurmd on 127.0.0.1) for the cluster tests, up once per
session, torn down by PID even when a test fails. Missing system packages fail the tests in CI (with
the command that installs them) and skip them elsewhere."""
import os
import subprocess
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
INSTALL = "sudo apt-get update && sudo apt-get install -y slurmctld slurmd slurm-client munge"


def require_slurm() -> None:
    done = subprocess.run([str(HERE / "install_deps.sh"), "--check"], capture_output=True, text=True)
    if done.returncode != 0:
        message = f"the cluster tests need Debian's Slurm and munge: {done.stderr.strip()} (or: {INSTALL})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def slurm_up(state: Path, nodes: int) -> dict[str, str]:
    require_slurm()
    done = subprocess.run([str(HERE / "slurm_up.sh"), str(state), str(nodes)], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0:
        subprocess.run([str(HERE / "slurm_down.sh"), str(state)], timeout=60)
        pytest.fail(f"slurm_up.sh failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    return {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory, defend_cache):
    """A 2-node cluster; yields the environment to run Slurm commands in (SLURM_CONF set)."""
    from defend.engine.ray_env import ensure_local_ray_config

    ensure_local_ray_config()  # the jobs start Ray: no cloud-metadata probe
    state = tmp_path_factory.mktemp("slurm")
    env = slurm_up(state, 2)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]
    try:
        yield env
    finally:
        subprocess.run([str(HERE / "slurm_down.sh"), str(state)], timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def job_state(job: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def wait_job(job: str, timeout: float = 400) -> dict[str, str]:
    """Poll until the job is finished (COMPLETED, FAILED, ...), across requeues; its last state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job)
        if state["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not finish within {timeout}s: {job_state(job)}")
