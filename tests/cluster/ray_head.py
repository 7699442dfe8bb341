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
import random
import re
import shutil
import signal
import socket
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


def ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))  # every interface: Ray's servers bind there or to the node IP
            return True
        except OSError:
            return False


def distinct_free_ports(n: int) -> list[int]:
    """``n`` free ports between Ray's worker range (10002-19999) and the kernel's ephemeral range: a port
    taken from the ephemeral range (bind to port 0) can be taken back, as the source port of any outgoing
    connection, before Ray listens on it; then the raylet cannot bind and `ray start` times out."""
    low = ephemeral_port_range()[0]
    candidates = random.sample(range(20000, low), k=min(20 * n, low - 20000)) if low > 20000 else []
    ports = [port for port in candidates if bindable(port)][:n]
    if len(ports) < n:
        raise RuntimeError(f"found {len(ports)} free ports below the ephemeral range ({low}); {n} needed")
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


def ray_logs(temp_dir: Path, tail: int = 1500) -> str:
    """The ends of the head's own server logs (why a raylet or GCS did not come up)."""
    logs = temp_dir / "session_latest" / "logs"
    parts = []
    for name in ("raylet.out", "raylet.err", "gcs_server.out", "gcs_server.err"):
        with contextlib.suppress(OSError):
            if text := (logs / name).read_text(errors="replace")[-tail:].strip():
                parts.append(f"--- {name} ---\n{text}")
    return "\n".join(parts)


def start_ray_head(env: dict[str, str], num_cpus: int = 2, timeout: float = 180, attempts: int = 2) -> RayHead:
    """A head of its own, up; a start that fails (on a loaded 2-core box the raylet can miss Ray's fixed
    30 s registration deadline) is reported on stderr and tried again, with fresh ports, ``attempts`` times."""
    for attempt in range(1, attempts):
        try:
            return start_ray_head_once(env, num_cpus, timeout)
        except RuntimeError as failure:
            print(f"Ray head start {attempt} of {attempts} failed, trying again: {failure}", file=sys.stderr)
    return start_ray_head_once(env, num_cpus, timeout)  # the last try: its failure is the test's


def start_ray_head_once(env: dict[str, str], num_cpus: int, timeout: float) -> RayHead:
    # short: Ray's unix socket paths under it must fit in 107 bytes
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-test-", dir="/tmp"))
    ports = dict(zip(PORT_FLAGS, distinct_free_ports(len(PORT_FLAGS)), strict=True))
    command = [RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", f"--num-cpus={num_cpus}", "--disable-usage-stats",
               *(f"--{flag}={port}" for flag, port in ports.items())]
    # a one-node head stays on loopback: Ray otherwise swaps 127.0.0.1 for the machine's own address
    env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if env.get("RAY_AUTH_MODE") == "token":  # `ray start` (2.60) makes no token, ray.init does: one as ray_cluster.sh
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, stdout=subprocess.DEVNULL)  # (the token)
    with open(temp_dir / "head.log", "w") as log:
        process = subprocess.Popen([*STOP_WITH_PARENT, *command], stdout=log, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    head = RayHead(process, temp_dir, ports)
    deadline = time.monotonic() + timeout
    while True:  # up: the dashboard answers and `ray start` is done starting (what it logs last)
        failed = None
        if process.poll() is not None:
            failed = f"`ray start --head` exited {process.returncode} before its job API answered"
        elif answers(f"{head.job_api}/api/version") and "block forever" in head.log():
            head.processes()  # remember them now: the teardown kills what it saw, even if reparented
            return head
        elif time.monotonic() > deadline:
            failed = f"the Ray head's job API ({head.job_api}) did not answer within {timeout}s"
        if failed:
            message = f"{failed} (ports {ports}):\n{head.log()}\n{ray_logs(temp_dir)}"
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
