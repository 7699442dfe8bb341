"""``launcher=torchrun`` / ``launcher=deepspeed``: start ``nproc`` ranks of a recipe on this node.

Each rank runs ``defend run <recipe> --config <config> <overrides> launcher=none``: the same recipe
file and config, one DeepSpeed rank each. A stop signal to this process (SIGTERM, SIGUSR1, SIGINT)
is passed on as SIGTERM, which the launchers forward to every rank: each saves a checkpoint and stops.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

from defend.config import ConfigError
from defend.engine.distributed import free_port

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def rank_command(recipe: str, config: str, overrides: list[str]) -> list[str]:
    """What each rank runs (Python module form, so launchers can prefix the interpreter)."""
    return ["-m", "defend.cli", "run", recipe, "--config", config, *overrides, "launcher=none"]


def launch_command(launcher: str, nproc: int, recipe: str, config: str, overrides: list[str]) -> list[str]:
    if launcher == "torchrun":  # standalone: a local rendezvous on a port the agent holds (no race)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *rank_command(recipe, config, overrides)]
    if launcher == "deepspeed":
        port = str(free_port())
        beside_python = Path(sys.executable).with_name("deepspeed")  # the venv's, when not on PATH
        deepspeed = str(beside_python) if beside_python.is_file() else shutil.which("deepspeed") or "deepspeed"
        module = rank_command(recipe, config, overrides)[1:]  # the launcher adds "python -m"
        return [deepspeed, f"--num_gpus={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
                "--no_local_rank", "--module", *module]
    raise ConfigError(f"launcher: '{launcher}' is not a local launcher (torchrun, deepspeed).")


def run_local(launcher: str, nproc: int, recipe: str, config: str, overrides: list[str]) -> int:
    """Run the ranks to the end; return the launcher's exit status."""
    if nproc < 1:
        raise ConfigError(f"nproc: must be at least 1, got {nproc}.")
    process = subprocess.Popen(launch_command(launcher, nproc, recipe, config, overrides))

    def forward(_signum, _frame):
        process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
