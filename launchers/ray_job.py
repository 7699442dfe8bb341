"""``defend submit ray``: run a recipe on a running Ray cluster through its job API.

    defend submit ray purify --config my_purify.yaml ray.address=http://HEAD:8265 output_dir=/shared/runs/p1

The job runs ``defend run <recipe> --config <config> <overrides> ray.address=auto`` on the head
node, with ``ray.working_dir`` (default: this folder) sent along as its working directory and this
process's offline/threads/cache settings (plus ``ray.env``) as its environment. Its logs stream
here; the exit status is the job's. Ctrl-C or SIGTERM stops the job (a purification resumes from
its shards, a training run from its checkpoint, when submitted again). Stopping sends the job's
driver SIGTERM, and Ray's job supervisor SIGKILLs it ``RAY_JOB_STOP_WAIT_TIME_S`` later (Ray's
default: 3 s, too short for a checkpoint): the job is submitted with ``STOP_WAIT_S`` there (unless
``ray.env`` or this environment sets it), and this client waits as long for the job to end.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import signal
import time
from pathlib import Path

from defend.config import Config, ConfigError, resolve_config_path
from defend.engine.preemption import STOPPED_EXIT_CODE
from defend.engine.ray_env import worker_env

# seconds Ray's job supervisor waits between the stop's SIGTERM and its SIGKILL (a checkpoint's save)
STOP_WAIT_S = 300


class _Stop(Exception):
    pass


def job_path(given: str, working_dir: Path | None, what: str) -> str:
    """How the job names a recipe or config file the client sees as ``given``."""
    path = Path(given).resolve()
    if working_dir is None:
        return str(path)  # the cluster's nodes see this filesystem
    try:
        return str(path.relative_to(working_dir))
    except ValueError:
        raise ConfigError(
            f"{what} '{given}' is outside ray.working_dir '{working_dir}', the folder sent to the cluster. Move it"
            " there, or put it where every node can read it and set ray.working_dir=null.") from None


def entrypoint(recipe: str, config: str, overrides: list[str], cfg: Config) -> str:
    working_dir = Path(cfg.ray.working_dir).resolve() if cfg.ray.working_dir is not None else None
    recipe_arg = job_path(recipe, working_dir, "recipe") if recipe.endswith(".py") else recipe
    config_file = resolve_config_path(config)
    shipped = not Path(config).exists()  # a shipped config's name: the cluster's defend has it too
    config_arg = config if shipped else job_path(str(config_file), working_dir, "config")
    return shlex.join([cfg.ray.job_python, "-m", "defend.cli", "run", recipe_arg, "--config", config_arg,
                       *overrides, "ray.address=auto"])


def check(cfg: Config) -> None:
    address = cfg.ray.address or ""
    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"ray.address: `defend submit ray` needs the cluster's job API, e.g."
                          f" ray.address=http://HEAD:8265 (the dashboard's address), got {address or 'null'}.")
    if not Path(cfg.output_dir).is_absolute():
        raise ConfigError(f"output_dir: '{cfg.output_dir}' is relative, so on the cluster it would land in the"
                          " job's unpacked working dir, which Ray deletes. Give an absolute path on storage the"
                          " cluster's nodes share, e.g. output_dir=/shared/runs/my_run.")


def stream_logs(client, job_id: str) -> None:
    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())


def exit_status(client, job_id: str) -> int:
    from ray.job_submission import JobStatus

    info = client.get_job_info(job_id)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    print(f"defend: Ray job {job_id} {info.status.value.lower()}: {info.message or ''}".rstrip(), flush=True)
    code = getattr(info, "driver_exit_code", None)
    return code if code else 1


def submit_ray(recipe: str, config: str, overrides: list[str], cfg: Config) -> int:
    """Submit, stream the logs, return the job's exit status."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    check(cfg)
    env = worker_env(cfg)
    env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", os.environ.get("RAY_JOB_STOP_WAIT_TIME_S", str(STOP_WAIT_S)))
    runtime_env = {"env_vars": env}
    if cfg.ray.working_dir is not None:
        runtime_env["working_dir"] = str(Path(cfg.ray.working_dir).resolve())
    command = entrypoint(recipe, config, overrides, cfg)
    client = JobSubmissionClient(cfg.ray.address)
    job_id = client.submit_job(entrypoint=command, runtime_env=runtime_env, metadata={"defend_recipe": recipe})
    print(f"defend: submitted Ray job {job_id} to {cfg.ray.address}: {command}", flush=True)

    def stop(signum, _frame):
        raise _Stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stream_logs(client, job_id)
        return exit_status(client, job_id)
    except _Stop as why:
        print(f"defend: {why} received: stopping Ray job {job_id}", flush=True)
        client.stop_job(job_id)
        deadline = time.monotonic() + float(env["RAY_JOB_STOP_WAIT_TIME_S"]) + 30
        while not client.get_job_status(job_id).is_terminal() and time.monotonic() < deadline:
            time.sleep(1)
        return STOPPED_EXIT_CODE if client.get_job_status(job_id) != JobStatus.SUCCEEDED else 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
