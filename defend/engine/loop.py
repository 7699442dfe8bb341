"""The training loop every training recipe shares: steps on a DeepSpeed engine, progress, loss log."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from defend.config import TrainConfig
from defend.engine.distributed import rank


def endless(loader) -> Iterator[Any]:
    """Batches of ``loader``, epoch after epoch."""
    while True:
        yield from loader


def train_loop(engine, batches: Iterator[Any], loss_fn: Callable[[Any], Any], total_steps: int,
               train: TrainConfig, log: logging.Logger, log_path: Path, desc: str = "train") -> dict:
    """Run ``total_steps`` optimizer steps of ``loss_fn(batch)`` (``train.grad_accum`` micro-batches each).

    Appends ``{"step", "loss", "lr", "elapsed_s"}`` to ``log_path`` every ``train.log_every`` steps.
    Returns the per-step losses and the wall time.
    """
    engine.train()
    step, losses, started = 0, [], time.perf_counter()
    log_path.unlink(missing_ok=True)
    progress = tqdm(total=total_steps, desc=desc, disable=rank() != 0)
    while step < total_steps:
        window = []
        for _ in range(train.grad_accum):
            loss = loss_fn(next(batches))
            engine.backward(loss)
            engine.step()
            window.append(loss.item())
        step += 1
        losses.append(sum(window) / len(window))
        progress.update(1)
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        if step % train.log_every == 0 or step == total_steps:
            recent = losses[-train.log_every:]
            record = {"step": step, "loss": sum(recent) / len(recent), "lr": engine.get_lr()[0],
                      "elapsed_s": round(time.perf_counter() - started, 2)}
            if rank() == 0:
                with log_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
            log.info("step %d/%d loss %.4f lr %.2e", step, total_steps, record["loss"], record["lr"])
    progress.close()
    return {"steps": step, "losses": losses, "train_seconds": round(time.perf_counter() - started, 2)}


def train_summary(result: dict, saved: Path, **extra: Any) -> dict:
    """What a training recipe returns and writes to ``train_summary.json``."""
    return {"steps": result["steps"], "first_loss": result["losses"][0], "final_loss": result["losses"][-1],
            **extra, "train_seconds": result["train_seconds"], "saved": str(saved)}
