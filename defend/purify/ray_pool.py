"""DiSP purification as a Ray Data pipeline: block specs -> actor pool (one model per actor: read
and decode the block's rows, saliency + masked generation, write the block's shard) -> counts back
to the driver. The driver only holds block offsets and counts; rows and images stay inside the
actor that needs them.

An actor that dies is restarted and its block re-run by Ray Data, at most ``purify.retries`` times (a
row that kills its actor every time must not loop forever); a block that raises is reported with
its index and input lines. A block's shard is written atomically, so a re-run replaces nothing but
a missing shard. A killed driver is restarted by running the same command: finished shards are
skipped.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from defend.config import Config
from defend.purify.blocks import Block
from defend.engine.ray_env import ensure_local_ray_config, ray_address, worker_env


BLOCK_FIELDS = ("index", "start", "end", "first_line", "rows", "sha256")


class BlockFailed(RuntimeError):
    """A block could not be purified; the message names it."""


class PurifyActor:
    """One model replica; ``__call__`` purifies the blocks of a batch (one block per batch)."""

    def __init__(self, cfg: Config, source: str, out: str):
        import torch

        from defend.models import load_model
        from defend.purify.masking import MaskedGenerator

        self.cfg = cfg
        torch.set_num_threads(max(1, int(self.cfg.purify.cpus_per_actor)))
        self.vlm = load_model(self.cfg)
        self.vlm.model.eval()
        self.generate = MaskedGenerator(self.vlm, self.cfg.purify)
        self.source, self.out = Path(source), Path(out)

    def __call__(self, batch: dict) -> dict:
        from defend.purify.blocks import purify_block

        counts = []
        for spec in zip(*(batch[k] for k in BLOCK_FIELDS)):
            block = Block(*(int(v) if k != "sha256" else str(v) for k, v in zip(BLOCK_FIELDS, spec)))
            try:
                counts.append(purify_block(self.cfg, self.source, block, self.vlm, self.generate, self.out))
            except Exception as err:
                raise BlockFailed(f"purify block {block.index} (input lines {block.first_line}-, {block.rows} rows"
                                  f" of {self.source}): {type(err).__name__}: {err}") from err
        memory = {"actor": os.getpid(), "peak_rss_mb": peak_rss_mb()}
        return {k: [c[k] for c in counts] for k in ("block", "rows", "quarantined")} | {
            k: [v] * len(counts) for k, v in memory.items()}


def first_line(err: BaseException) -> str:
    """The failing block's own message out of Ray's wrapped error."""
    import re

    text = str(err)
    found = re.findall(r"BlockFailed: (purify block .*)", text)
    return found[-1] if found else (text.splitlines() or [type(err).__name__])[-1]


def reset_peak_rss() -> None:
    """Start this process's peak-memory count anew (Linux: its VmHWM), so an in-process run reports its
    own peak, not that of what the process did before (a test session, a notebook)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux, or not allowed: the lifetime peak is reported


def peak_rss_mb() -> float:
    """This process's peak resident memory since ``reset_peak_rss`` (Linux VmHWM), else over its lifetime."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def purify_on_ray(cfg: Config, source: Path, out: Path, blocks: list[Block]) -> Iterator[dict]:
    """Purify ``blocks`` on an actor pool of ``purify.actors``; yields each finished block's counts."""
    import ray

    embedded = cfg.ray.address is None
    if embedded:
        ensure_local_ray_config()
    os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
    env = {**worker_env(cfg), "OMP_NUM_THREADS": str(max(1, int(cfg.purify.cpus_per_actor)))}
    cwd = os.getcwd()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, env.get("PYTHONPATH")) if p)
    started_here = not ray.is_initialized()
    if started_here:
        cpus = max(os.cpu_count() or 1, int(cfg.purify.actors * cfg.purify.cpus_per_actor) + 1)
        ray.init(address=ray_address(cfg), runtime_env={"env_vars": env},
                 include_dashboard=False if embedded else None,
                 log_to_driver=False, **({"_node_ip_address": "127.0.0.1", "num_cpus": cpus} if embedded else {}))
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        specs = ray.data.from_items([dataclasses.asdict(b) for b in blocks], override_num_blocks=max(1, len(blocks)))
        done = specs.map_batches(
            PurifyActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=cfg.purify.actors),
            fn_constructor_args=(cfg, str(source.resolve()), str(out.resolve())),
            num_cpus=cfg.purify.cpus_per_actor, num_gpus=cfg.purify.gpus_per_actor or None,
            max_restarts=cfg.purify.retries, max_task_retries=cfg.purify.retries)
        try:
            yield from done.iter_rows()
        except Exception as err:
            raise BlockFailed(f"purification stopped after {cfg.purify.retries} retries: {first_line(err)}") from err
    finally:
        if started_here:
            ray.shutdown()
