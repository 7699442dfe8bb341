"""Training checkpoints that resume exactly: DeepSpeed engine state (weights, optimizer, lr schedule,
every ZeRO shard), the data position and every random state, under ``output_dir/checkpoints``.

Layout: ``checkpoints/step_000300/`` holds DeepSpeed's files (the trainable parameters only: a LoRA
run's checkpoint is the adapter and its optimizer state, not the frozen base, which the rerun loads
from ``model.path`` again), ``rng_rank{r}.pt`` per rank and ``trainer_state.json``. A save goes into a
fresh ``step_N.partial`` folder, gets its state file once every rank has written, and is renamed into
place: a kill mid-save leaves a partial folder that is never resumed from (and is cleared by the next
save), never a stale marker beside mixed files. The newest ``train.keep_checkpoints`` folders, by
when they were written, are kept. Random states load with ``weights_only=True``: a checkpoint folder
from someone else cannot run code.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from defend.atomic import fsync_dir, settle_tree, write_json
from defend.config import Config, ConfigError
from defend.engine.distributed import barrier, rank, world_size

STATE_FILE = "trainer_state.json"
TAG = re.compile(r"^step_(\d+)$")


def random_states(generators: dict[str, torch.Generator]) -> dict:
    """Every random state, as tensors, lists and numbers only (what ``torch.load(weights_only=True)`` reads)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(internal), gauss],
              "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
              "torch": torch.get_rng_state(), "generators": {n: g.get_state() for n, g in generators.items()}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def load_states(path: Path) -> dict:
    """A rank's random and objective states; refuses a file that would need to run code to load."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # an unpickling error: the file holds more than tensors, lists and numbers
        raise ConfigError(f"train.resume: {path} cannot be loaded as plain data ({str(err).splitlines()[0][:200]});"
                          " defend never unpickles code from a checkpoint. Resume from a checkpoint this"
                          " version wrote, or start over with train.resume=never.") from err


def restore_random_states(states: dict, generators: dict[str, torch.Generator]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
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
    # by when they were written (a resume=never run in a used folder keeps what it wrote), then by step
    return sorted(found, key=lambda p: ((p / STATE_FILE).stat().st_mtime_ns, int(TAG.match(p.name).group(1))))


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
        folder, partial = self.root / tag, self.root / f"{tag}.partial"
        if rank() == 0 and partial.exists():  # a save that was killed
            shutil.rmtree(partial)
        barrier()
        # trainable parameters only (and their optimizer state): the frozen base is model.path's
        engine.save_checkpoint(str(self.root), tag=partial.name, save_latest=False, exclude_frozen_parameters=True)
        partial.mkdir(parents=True, exist_ok=True)
        torch.save({**random_states(self.generators), "stateful": {k: v.state_dict() for k, v in self.stateful.items()}},
                   partial / f"rng_rank{rank()}.pt")
        barrier()
        if rank() == 0:
            write_json(partial / STATE_FILE, {"step": step, "consumed_samples_per_rank": step * self.samples_per_step,
                                              "samples_per_step": self.samples_per_step, "world_size": world_size()})
            settle_tree(partial)
            if folder.exists():  # this step saved before, by a run being redone
                shutil.rmtree(folder)
            os.replace(partial, folder)
            fsync_dir(self.root)
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
        states = load_states(folder / f"rng_rank{rank()}.pt")  # before anything is loaded into the engine
        # frozen parameters are not in the checkpoint: they stay as model.path loaded them
        load_path, _ = engine.load_checkpoint(str(folder.parent), tag=folder.name, load_module_strict=False)
        if load_path is None:
            raise ConfigError(f"train.resume: DeepSpeed could not load {folder}; is it complete?")
        restore_random_states(states, self.generators)
        for name, obj in self.stateful.items():
            obj.load_state_dict(states.get("stateful", {}).get(name, {}))
        return state["step"]
