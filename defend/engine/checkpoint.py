"""Training checkpoints that resume exactly: DeepSpeed engine state (weights, optimizer, lr schedule,
every ZeRO shard), the data position and every random state, under ``output_dir/checkpoints``.

Layout: ``checkpoints/step_000300/`` holds DeepSpeed's files, ``rng_rank{r}.pt`` per rank and, last,
``trainer_state.json`` (written once every rank has saved: a folder without it is incomplete and
never resumed from). The newest ``train.keep_checkpoints`` folders are kept.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defend.atomic import write_json
from defend.config import Config, ConfigError
from defend.engine.distributed import barrier, rank, world_size

STATE_FILE = "trainer_state.json"
TAG = re.compile(r"^step_(\d+)$")


def random_states(generators: dict[str, torch.Generator]) -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "generators": {name: g.get_state() for name, g in generators.items()}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_random_states(states: dict, generators: dict[str, torch.Generator]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    for name, generator in generators.items():
        generator.set_state(states["generators"][name])


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if TAG.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(TAG.match(p.name).group(1)))


@dataclass
class Checkpointer:
    """Saves and restores a training run's state; ``samples_per_step`` is one rank's per optimizer step."""

    root: Path
    save_every: int | None
    keep: int
    samples_per_step: int
    generators: dict[str, torch.Generator] = field(default_factory=dict)
    # objects with state_dict()/load_state_dict() saved per rank (e.g. the training objective)
    stateful: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_run(cls, cfg: Config, generators: dict[str, torch.Generator] | None = None,
                stateful: dict[str, Any] | None = None) -> Checkpointer:
        """The checkpoints of the run ``cfg`` describes, under ``output_dir/checkpoints``."""
        from defend.data.sampler import samples_per_step

        t = cfg.train
        return cls(Path(cfg.output_dir) / "checkpoints", t.save_every, t.keep_checkpoints, samples_per_step(t),
                   generators or {}, stateful or {})

    def due(self, step: int) -> bool:
        return bool(self.save_every) and step % self.save_every == 0

    def save(self, engine, step: int) -> Path:
        """Every rank calls it; returns the checkpoint folder."""
        tag = f"step_{step:06d}"
        folder = self.root / tag
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({**random_states(self.generators), "stateful": {k: v.state_dict() for k, v in self.stateful.items()}},
                   folder / f"rng_rank{rank()}.pt")
        barrier()
        if rank() == 0:
            write_json(folder / STATE_FILE, {"step": step, "consumed_samples_per_rank": step * self.samples_per_step,
                                             "samples_per_step": self.samples_per_step, "world_size": world_size()})
            for old in complete_checkpoints(self.root)[: -max(1, self.keep)]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()
        return folder

    def find(self, resume: str) -> Path | None:
        """The checkpoint ``train.resume`` names: "auto" (newest here, if any), "never", or a folder."""
        if resume == "never":
            return None
        if resume == "auto":
            found = complete_checkpoints(self.root)
            return found[-1] if found else None
        folder = Path(resume)
        if not (folder / STATE_FILE).is_file():
            raise ConfigError(
                f"train.resume: '{folder}' is not a finished checkpoint (no {STATE_FILE}); give a folder"
                f" such as {self.root}/step_000100, or 'auto' / 'never'."
            )
        return folder

    def restore(self, engine, resume: str) -> int:
        """Load the checkpoint ``resume`` names into ``engine``; return the step to continue from (0: none)."""
        folder = self.find(resume)
        if folder is None:
            return 0
        state = json.loads((folder / STATE_FILE).read_text())
        if state["world_size"] != world_size():
            raise ConfigError(
                f"train.resume: {folder} was written by {state['world_size']} ranks and this run has"
                f" {world_size()}. ZeRO checkpoints are per rank: resume with nproc={state['world_size']},"
                " or convert it first (DeepSpeed's ds_to_universal.py) and start a new run from the result."
            )
        if state["samples_per_step"] != self.samples_per_step:
            raise ConfigError(
                f"train.resume: {folder} was trained with {state['samples_per_step']} samples per rank and"
                f" step, this run has {self.samples_per_step} (train.micro_batch_size x train.grad_accum);"
                " resume with the same batch settings, or set train.resume=never to start over."
            )
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if load_path is None:
            raise ConfigError(f"train.resume: DeepSpeed could not load {folder}; is it complete?")
        states = torch.load(folder / f"rng_rank{rank()}.pt", weights_only=False)
        restore_random_states(states, self.generators)
        for name, obj in self.stateful.items():
            obj.load_state_dict(states.get("stateful", {}).get(name, {}))
        return state["step"]
