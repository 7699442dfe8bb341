"""A test's Ray head stops politely: stopping it ends every process of its own and none of another Ray
on the machine (here a second head, standing for a user's job or a concurrent test), which `ray stop
--force` would have killed. Neither writes the machine-wide address file that `ray.init("auto")` reads."""
import os
from pathlib import Path

from tests.cluster.ray_head import (
    alive,
    answers,
    own_ray_head,
    start_ray_head,
    stop_ray_head,
)

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
DEFAULT_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")


def address_file_state() -> tuple[float, str] | None:
    try:
        return DEFAULT_ADDRESS_FILE.stat().st_mtime, DEFAULT_ADDRESS_FILE.read_text()
    except OSError:
        return None


def test_stopping_a_test_head_stops_all_of_it_and_leaves_another_ray_running():
    before = address_file_state()
    with own_ray_head(ENV, num_cpus=1) as bystander:
        theirs = bystander.processes()
        mine = start_ray_head(ENV, num_cpus=1)
        ours = mine.processes()
        names = {p.name() for p in ours}
        assert {"raylet", "gcs_server"} <= names, f"the head's processes were not found: {sorted(names)}"
        assert not {p.pid for p in ours} & {p.pid for p in theirs}
        assert (mine.temp_dir / "ray_current_cluster").read_text().endswith(f":{mine.ports['port']}")
        stop_ray_head(mine)

        left = [f"{p.pid} {p.name()}" for p in ours if alive(p)]
        assert not left, f"stop_ray_head left processes of its head running: {left}"
        assert not mine.temp_dir.exists(), "the head's temp dir was not removed"
        killed = [p.pid for p in theirs if not alive(p)]
        assert not killed, f"stopping one head killed processes of another Ray on the machine: {killed}"
        assert answers(f"{bystander.job_api}/api/version"), "the other head's job API stopped answering"
    assert not [p.pid for p in theirs if alive(p)], "the bystander head's processes outlived its stop"
    assert address_file_state() == before, f"a test head wrote {DEFAULT_ADDRESS_FILE} (ray.init('auto') reads it)"
