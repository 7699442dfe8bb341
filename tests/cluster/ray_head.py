"""A Ray head of a test's own: its own temp dir (sockets, logs, the `ray_current_cluster` file that
`ray.init("auto")` reads) and its own ports, stopped by PID, never by `ray stop` (which stops every Ray
on the machine: a user's job, or another test's Ray).

`ray start --head --block` runs in a session of its own (Ray's reaper kills that process group when the
head ends, never the test's), and SIGTERM to it shuts its node down. What is left after that is killed
by PID: the head's descendants and process group, and any process whose command line names the head's
temp dir (a worker or job driver that moved to a session of its own)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from defend.engine.distributed import free_port

RAY = str(Path(sys.executable).with_name("ray"))
# every port a head opens that has a fixed default (10001 client server, 52365 agent, ...) or a random one
PORT_FLAGS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "node-manager-port", "object-manager-port", "metrics-export-port",
              "runtime-env-agent-port")


# `ray start` execs from a process that asked Linux for SIGTERM when its parent (the test) dies: a killed
# pytest leaves no head behind, which its own session would otherwise outlive
EXEC_WITH_PDEATHSIG = "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 15); os.execv(sys.argv[1], sys.argv[1:])"
STOP_WITH_PARENT = [sys.executable, "-c", EXEC_WITH_PDEATHSIG] if sys.platform.startswith("linux") else []


@dataclass
class RayHead:
    process: subprocess.Popen
    temp_dir: Path
    ports: dict[str, int]
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    @property
    def job_api(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    def log(self) -> str:
        path = self.temp_dir / "head.log"
        return path.read_text(errors="replace")[-4000:] if path.is_file() else ""

    def processes(self) -> list[psutil.Process]:
        """This head's processes alive now, and every one seen before that is still alive: the head, its
        descendants, its process group's members, any process whose command line names its temp dir."""
        found = {}
        head = self.seen.get(self.process.pid)
        with contextlib.suppress(psutil.NoSuchProcess):
            head = head or psutil.Process(self.process.pid)
            found[head.pid] = head
            found.update((p.pid, p) for p in head.children(recursive=True))
        # while the head (a zombie included) holds its pid, no other process group can have that id
        group = head is not None and head.is_running()
        mentions = re.compile(re.escape(str(self.temp_dir)) + "(/|$)")
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error, ProcessLookupError):
                if (group and os.getpgid(proc.pid) == self.process.pid) or any(
                        mentions.search(arg) for arg in proc.info["cmdline"] or ()):
                    found[proc.pid] = proc
        self.seen.update(found)
        return [p for p in self.seen.values() if alive(p)]


def alive(proc: psutil.Process) -> bool:
    try:  # is_running also tells a reused PID from the process it once was
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports and port >= 20000:  # above Ray's worker port range (10002-19999)
            ports.append(port)
    return ports


def answers(url: str) -> bool:
    """Whether an HTTP server answers at ``url`` (401 included: Ray's token auth)."""
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def start_ray_head(env: dict[str, str], num_cpus: int = 2, timeout: float = 180) -> RayHead:
    # short: Ray's unix socket paths under it must fit in 107 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-test-", dir="/tmp"))
    ports = dict(zip(PORT_FLAGS, distinct_free_ports(len(PORT_FLAGS)), strict=True))
    command = [RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats",
               *(f"--{flag}={port}" for flag, port in ports.items())]
    with open(temp_dir / "head.log", "w") as log:
        process = subprocess.Popen([*STOP_WITH_PARENT, *command], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    head = RayHead(process, temp_dir, ports)
    deadline = time.monotonic() + timeout
    while True:  # up: the dashboard answers and `ray start` is done starting (what it logs last)
        if process.poll() is not None:
            message = f"`ray start --head` exited {process.returncode} before its job API answered:\n{head.log()}"
            stop_ray_head(head)
            raise RuntimeError(message)
        if answers(f"{head.job_api}/api/version") and "block forever" in head.log():
            head.processes()  # remember them now: the teardown kills what it saw, even if reparented
            return head
        if time.monotonic() > deadline:
            message = f"the Ray head's job API ({head.job_api}) did not answer within {timeout}s:\n{head.log()}"
            stop_ray_head(head)
            raise RuntimeError(message)
        time.sleep(0.5)


def stop_ray_head(head: RayHead, grace: float = 10) -> list[str]:
    """SIGTERM to `ray start --block` (it stops its node: ~5 s when idle, over 30 s after a job here), then
    after ``grace`` SIGKILL to whatever of it is left; the command lines of those killed."""
    procs = head.processes()
    with contextlib.suppress(ProcessLookupError):
        head.process.send_signal(signal.SIGTERM)
    psutil.wait_procs([p for p in procs if p.pid != head.process.pid], timeout=grace)
    killed = []
    for proc in head.processes():  # psutil refuses a pid that a new process took meanwhile
        with contextlib.suppress(psutil.NoSuchProcess):
            killed.append(" ".join(proc.cmdline())[:200] or proc.name())
            proc.kill()
    psutil.wait_procs(head.processes(), timeout=10)
    head.process.wait(timeout=10)  # reaped last: till then no other process group can take its pid
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    return killed


@contextlib.contextmanager
def own_ray_head(env: dict[str, str], num_cpus: int = 2) -> Iterator[RayHead]:
    head = start_ray_head(env, num_cpus)
    try:
        yield head
    finally:
        stop_ray_head(head)
