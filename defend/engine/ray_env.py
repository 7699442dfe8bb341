"""What every Ray driver of ours sets up the same way (Ray Train workers, the purification actor pool,
a submitted job): which cluster to join, the local-cluster marker file, the environment workers inherit."""
from __future__ import annotations

import os
from pathlib import Path

from defend.config import Config

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
