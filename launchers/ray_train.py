"""``launcher=ray``: run a recipe as ``nproc`` Ray Train workers, one DeepSpeed rank each.

    defend run finetune --config my.yaml launcher=ray nproc=8 ray.address=auto ray.gpus_per_worker=1

Ray Train's ``TorchTrainer`` starts the workers, gives each its rank and builds the process group
(gloo on CPU, NCCL on GPU); the recipe inside is the same file that torchrun starts, and DeepSpeed
joins the group Ray made. Why Ray Train rather than our own actor group over a placement group: it
already does rank assignment, process-group setup, worker failure detection and log streaming, and
users' Ray clusters already run it. What we add: a bounded wait for resources (a cluster that cannot
place every worker fails with a message naming what is missing, instead of pending forever), the
run's environment on every worker, and the driver's working directory, so relative paths in configs
mean the same on every worker (a shared filesystem, as on any training cluster).

``ray.address``: null starts an embedded local Ray (laptop, tests); "auto" joins the cluster this
process runs on (e.g. inside ``ray job submit``); HOST:PORT joins that one.

Preemption: SIGTERM or SIGUSR1 to the driver (Slurm's warning signal through ``run_requeueable``,
``ray job stop``, ``kill``) does not end it. The handler sets a small actor that every worker's
training loop asks at each step boundary (``defend.engine.preemption.stop_source``); the ranks save a
checkpoint at the next step, return, and the driver, which waits for them, exits with
``STOPPED_EXIT_CODE`` (75): the same command resumes (``train.resume=auto``). Ray Train's own
``get_preemption_info`` covers a node the cluster drains, not a signal to the driver, so it is not
used here. A second signal ends the driver at once, without a save (a recipe with no training loop
never polls).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from defend.config import Config, ConfigError
from defend.engine.preemption import STOP_SIGNALS, TrainingStopped, stop_source
from defend.engine.ray_env import ensure_local_ray_config, ray_address, worker_env


def worker_bundle(cfg: Config) -> dict[str, float]:
    bundle = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.gpus_per_worker:
        bundle["GPU"] = cfg.ray.gpus_per_worker
    return bundle


def wait_for_placement(cfg: Config) -> None:
    """Reserve every worker's resources once, within ``ray.placement_timeout_s``, or fail saying why."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = worker_bundle(cfg)
    group = placement_group([bundle] * cfg.nproc, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=cfg.ray.placement_timeout_s)
    except GetTimeoutError:
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        free = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        needed = {k: v * cfg.nproc for k, v in bundle.items()}
        raise ConfigError(
            f"ray: the cluster cannot place {cfg.nproc} workers of {bundle} (needs {needed}) within"
            f" ray.placement_timeout_s={cfg.ray.placement_timeout_s:g}s; cluster total {total}, free {free}."
            " Lower nproc or ray.cpus_per_worker / ray.gpus_per_worker, free the busy resources, or add nodes."
        ) from None
    finally:
        remove_placement_group(group)


class StopFlag:
    """The driver's stop signal, for the workers (a Ray actor the driver owns): ``request`` from the
    driver's handler, ``requested`` from every rank at each step, ``stopped`` from the ranks once
    their checkpoint is saved."""

    def __init__(self):
        self.signal_name: str | None = None
        self.saved: tuple[int, str] | None = None

    def request(self, signal_name: str) -> None:
        self.signal_name = self.signal_name or signal_name

    def requested(self) -> str | None:
        return self.signal_name

    def stopped(self, step: int, checkpoint: str) -> None:
        self.saved = (step, checkpoint)

    def state(self) -> tuple[str | None, tuple[int, str] | None]:
        return self.signal_name, self.saved


class StopOnSignal:
    """While active in the driver: the first SIGTERM/SIGUSR1 sets the ``StopFlag`` (from a thread:
    the handler itself makes no Ray call), a second one ends the driver at once."""

    def __init__(self, flag):
        self.flag, self.got, self.previous = flag, threading.Event(), {}
        self.name = ""

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        threading.Thread(target=self._deliver, daemon=True, name="defend-stop").start()
        return self

    def _handle(self, signum, _frame) -> None:
        if self.got.is_set():  # asked twice: no more waiting for a save
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.name = signal.Signals(signum).name
        print(f"defend: {self.name} received: the Ray workers save a checkpoint at the next step and stop"
              " (send it again to stop at once, without a save)", file=sys.stderr, flush=True)
        self.got.set()

    def _deliver(self) -> None:
        import ray

        self.got.wait()
        ray.get(self.flag.request.remote(self.name))

    def __exit__(self, *_exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def _worker(job: dict) -> None:
    """One Ray Train worker: the recipe, in the driver's directory, as one rank; a stop the driver
    was asked for reaches its training loop through ``job["stop"]`` (a ``StopFlag``)."""
    import ray

    from defend.runner import run_recipe

    if Path(job["cwd"]).is_dir():
        os.chdir(job["cwd"])
    flag = job["stop"]
    with stop_source(lambda: ray.get(flag.requested.remote(), timeout=60)):
        try:
            run_recipe(job["recipe"], job["config"], [*job["overrides"], "launcher=none"])
        except TrainingStopped as stopped:  # saved: a clean return, the driver reports the stop
            ray.get(flag.stopped.remote(stopped.step, str(stopped.checkpoint)), timeout=60)


def run_on_ray(recipe: str, config: str, overrides: list[str], cfg: Config) -> int:
    """Run the recipe on ``cfg.nproc`` Ray workers; return its exit status (0, or 1 if a worker failed);
    raise ``TrainingStopped`` when a stop signal made the workers save and stop."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if cfg.nproc < 1:
        raise ConfigError(f"nproc: must be at least 1, got {cfg.nproc}.")
    embedded = cfg.ray.address is None
    if embedded:
        ensure_local_ray_config()
    env = worker_env(cfg)
    # inside `ray job submit --runtime-env-json ...`, merge our env vars into the job's instead of
    # failing on keys both set (Ray's own switch)
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    ray.init(address=ray_address(cfg), runtime_env={"env_vars": env}, include_dashboard=False if embedded else None,
             **({"_node_ip_address": "127.0.0.1"} if embedded else {}))
    try:
        wait_for_placement(cfg)
        out = Path(cfg.output_dir).resolve()
        flag = ray.remote(num_cpus=0)(StopFlag).remote()
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"recipe": str(Path(recipe).resolve()) if recipe.endswith(".py") else recipe,
                               "config": str(Path(config).resolve()) if Path(config).exists() else config,
                               "overrides": [*overrides, f"output_dir={out}"], "cwd": os.getcwd(),
                               "stop": flag},
            scaling_config=ScalingConfig(num_workers=cfg.nproc, use_gpu=cfg.ray.gpus_per_worker > 0,
                                         resources_per_worker=worker_bundle(cfg)),
            torch_config=TorchConfig(backend="nccl" if cfg.ray.gpus_per_worker > 0 else "gloo"),
            run_config=RunConfig(name="ray_train", storage_path=str(out)),
        )
        try:
            with StopOnSignal(flag):
                trainer.fit()
        except Exception as err:  # Ray's TrainingFailedError carries the workers' tracebacks
            if not any(c.__name__ == "TrainingFailedError" for c in type(err).__mro__):
                raise
            print(f"defend: error: the Ray workers failed: {err}", file=sys.stderr)
            return 1
        signal_name, saved = ray.get(flag.state.remote())
    finally:
        ray.shutdown()
    if saved is not None:  # the CLI prints it and exits with STOPPED_EXIT_CODE
        raise TrainingStopped(saved[0], Path(saved[1]), signal_name)
    return 0
