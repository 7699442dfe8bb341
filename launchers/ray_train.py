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
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from defend.config import Config, ConfigError

# environment the workers inherit from the driver when set (offline flags, threads, caches)
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_DATASETS_OFFLINE", "OMP_NUM_THREADS",
                 "TOKENIZERS_PARALLELISM", "DEFEND_CACHE", "RAY_USAGE_STATS_ENABLED", "PYTHONPATH")
LOCAL_RAY_CONFIG = "provider:\n  type: local\n"


def ray_address(cfg: Config) -> str | None:
    """``ray.address``; unset: the job's cluster inside a Ray job (RAY_ADDRESS), else a private local
    instance ("local"), never a cluster that some other job started on this machine."""
    if cfg.ray.address:
        return cfg.ray.address
    return None if os.environ.get("RAY_ADDRESS") else "local"


def ensure_local_ray_config(home: Path | None = None) -> None:
    """Ray's dashboard probes cloud metadata addresses at start unless this file marks the cluster local."""
    path = (home or Path.home()) / "ray_bootstrap_config.yaml"
    if not path.exists():
        path.write_text(LOCAL_RAY_CONFIG)


def worker_env(cfg: Config) -> dict[str, str]:
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, int(cfg.ray.cpus_per_worker))))
    return {**env, **cfg.ray.env}


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


def _worker(job: dict) -> None:
    """One Ray Train worker: the recipe, in the driver's directory, as one rank."""
    from defend.cli import run_recipe

    if Path(job["cwd"]).is_dir():
        os.chdir(job["cwd"])
    run_recipe(job["recipe"], job["config"], [*job["overrides"], "launcher=none"])


def run_on_ray(recipe: str, config: str, overrides: list[str], cfg: Config) -> int:
    """Run the recipe on ``cfg.nproc`` Ray workers; return its exit status (0, or 1 if a worker failed)."""
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
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"recipe": str(Path(recipe).resolve()) if recipe.endswith(".py") else recipe,
                               "config": str(Path(config).resolve()) if Path(config).exists() else config,
                               "overrides": [*overrides, f"output_dir={out}"], "cwd": os.getcwd()},
            scaling_config=ScalingConfig(num_workers=cfg.nproc, use_gpu=cfg.ray.gpus_per_worker > 0,
                                         resources_per_worker=worker_bundle(cfg)),
            torch_config=TorchConfig(backend="nccl" if cfg.ray.gpus_per_worker > 0 else "gloo"),
            run_config=RunConfig(name="ray_train", storage_path=str(out)),
        )
        try:
            trainer.fit()
        except Exception as err:  # Ray's TrainingFailedError carries the workers' tracebacks
            if not any(c.__name__ == "TrainingFailedError" for c in type(err).__mro__):
                raise
            print(f"defend: error: the Ray workers failed: {err}", file=sys.stderr)
            return 1
    finally:
        ray.shutdown()
    return 0
