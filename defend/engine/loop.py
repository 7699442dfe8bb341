"""The training loop every training recipe shares: steps on a DeepSpeed engine, progress, loss log,
checkpoints, and a clean stop on a preemption signal."""
from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from defend.atomic import write_text
from defend.config import TrainConfig
from defend.data.samples import DataError
from defend.engine.checkpoint import Checkpointer
from defend.engine.distributed import rank, world_size
from defend.engine.memory import explain_out_of_memory
from defend.engine.preemption import StopRequest, TrainingStopped
from defend.engine.reporting import Reporters
from defend.progress import Progress, duration, eta


def total_steps(train: TrainConfig, n_samples: int) -> int:
    """``train.max_steps``, or ``train.epochs`` over ``n_samples`` split across the ranks."""
    per_epoch = n_samples // world_size() // (train.micro_batch_size * train.grad_accum)
    return train.max_steps or max(1, math.ceil(train.epochs * per_epoch))


def read_train_log(log_path: Path, log: logging.Logger | None = None) -> list[dict]:
    """The records of a loss log. A last line cut short (the run was killed while appending it: no
    newline, not JSON) is dropped with a warning; any other line that is not a record is corruption, a
    DataError naming the file and the line."""
    lines = log_path.read_bytes().decode("utf-8", errors="replace").split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not an object with an integer 'step'")
        except ValueError as err:
            if n == len(lines):  # the last line, without its newline: torn by a kill mid-write
                if log is not None:
                    log.warning("%s line %d: dropped the last record, cut short when the run was stopped (%r)",
                                log_path, n, line[:80])
                continue
            raise DataError(f"{log_path} line {n}: not a loss record ({err}): {line[:120]!r}; the log is corrupt."
                            " Delete or repair that line (or move the file away: the resumed run then logs"
                            " only its own steps) and resume again.") from None
        records.append(record)
    return records


def keep_log_until(log_path: Path, step: int, log: logging.Logger | None = None) -> None:
    """Drop the records after ``step`` (a resumed run rewrites them), and a torn last one; none at all
    when ``step`` is 0."""
    if rank() != 0 or not log_path.exists():
        return
    if step == 0:
        log_path.unlink()
        return
    kept = [r for r in read_train_log(log_path, log) if r["step"] <= step]
    write_text(log_path, "".join(json.dumps(r) + "\n" for r in kept))  # whole or not at all


def training_knobs(train: TrainConfig) -> dict[str, object]:
    """The settings that shrink a training step's memory (raise train.grad_accum to keep the batch)."""
    return {"train.micro_batch_size": train.micro_batch_size, "train.max_length": train.max_length}


def train_loop(engine, batches: Iterator[Any], loss_fn: Callable[[Any], Any], total_steps: int,
               train: TrainConfig, log: logging.Logger, log_path: Path, desc: str = "train",
               checkpoints: Checkpointer | None = None, start_step: int = 0) -> dict:
    """Run optimizer steps ``start_step+1 .. total_steps`` of ``loss_fn(batch)`` (``train.grad_accum``
    micro-batches each).

    ``loss_fn`` returns the loss, or ``(loss, terms)`` with named floats (an objective's parts of the
    loss). Every ``train.log_every`` steps, hands ``{"step", "loss", "lr", "elapsed_s", **terms}``
    (averages over those steps) to the reporters of ``train.report_to`` on rank 0 (``jsonl``: appended
    to ``log_path``) and logs one line with them, samples/s (tokens/s when batches carry an attention
    mask), elapsed time and ETA; a bar as well only when stderr is a terminal (``defend/progress.py``).
    With ``checkpoints``: saves every ``train.save_every`` steps, and on SIGTERM/SIGUSR1 saves and
    raises ``TrainingStopped``. Returns the per-step losses of this run and its wall time.
    """
    engine.train()
    step, losses, terms, started = start_step, [], [], time.perf_counter()
    keep_log_until(log_path, start_step, log)
    if start_step:
        log.info("resumed at step %d of %d", start_step, total_steps)
    stop = StopRequest() if checkpoints else None
    reporters = Reporters(train.report_to, log_path, start_step, active=rank() == 0)
    progress = Progress(total_steps, desc, initial=start_step, unit="step", every_s=None, log=log, enabled=rank() == 0)
    window_started, window_step, window_tokens = started, start_step, 0
    try:
        while step < total_steps:
            window, window_terms = [], []
            for _ in range(train.grad_accum):
                batch = next(batches)
                with explain_out_of_memory(f"{desc} step {step + 1}", training_knobs(train), batch,
                                           also="raise train.grad_accum to keep the batch, or shard more"
                                                " (deepspeed=zero3, quant.load_in_4bit=true)"):
                    loss = loss_fn(batch)
                    loss, parts = loss if isinstance(loss, tuple) else (loss, {})
                    engine.backward(loss)
                    engine.step()
                window.append(loss.item())
                window_tokens += batch_tokens(batch)
                window_terms.append(parts)
            step += 1
            losses.append(sum(window) / len(window))
            terms.append(mean_terms(window_terms))
            progress.update(1, loss=f"{losses[-1]:.4f}")
            if step % train.log_every == 0 or step == total_steps:
                recent = losses[-train.log_every:]
                now = time.perf_counter()
                record = {"step": step, "loss": sum(recent) / len(recent), "lr": engine.get_lr()[0],
                          "elapsed_s": round(now - started, 2), **mean_terms(terms[-train.log_every:])}
                reporters.log(record)
                log.info("%s", step_line(record, total_steps, start_step, step - window_step, now - window_started,
                                         window_tokens, train))
                window_started, window_step, window_tokens = now, step, 0
            if checkpoints is None:
                continue
            stopping = stop.requested() and step < total_steps
            if checkpoints.due(step) or stopping:
                folder = checkpoints.save(engine, step)
                log.info("checkpoint %s", folder)
                if stopping:
                    raise TrainingStopped(step, folder, stop.received)
    finally:
        progress.close()
        reporters.close()
        if stop is not None:
            stop.close()
    return {"steps": step, "losses": losses, "terms": terms, "train_seconds": round(time.perf_counter() - started, 2),
            "peak_memory_mb_per_rank": peak_memory_per_rank()}


def batch_tokens(batch: Any) -> int:
    """Tokens of a micro-batch that has an ``attention_mask`` (0 for one that has none)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else getattr(batch, "attention_mask", None)
    return int(mask.sum()) if isinstance(mask, torch.Tensor) else 0


def step_line(record: dict, total_steps: int, start_step: int, steps: int, seconds: float, tokens: int,
              train: TrainConfig) -> str:
    """``step 50/400 loss 1.2345 (task 1.2000 pcr 0.0345) lr 2.00e-03 | 51.2 samples/s 3.1e+03 tokens/s |
    elapsed 1m02s ETA 7m14s``: the last ``steps`` steps took ``seconds`` and saw ``tokens`` on this rank
    (times the ranks: all of them)."""
    step, ranks = record["step"], world_size()
    terms = " ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("step", "loss", "lr", "elapsed_s"))
    rate = f"{steps * train.micro_batch_size * train.grad_accum * ranks / seconds:.3g} samples/s" if seconds > 0 else ""
    if tokens and seconds > 0:
        rate += f" {tokens * ranks / seconds:.3g} tokens/s"
    left = eta(step - start_step, total_steps - start_step, record["elapsed_s"])
    return (f"step {step}/{total_steps} loss {record['loss']:.4f}{f' ({terms})' if terms else ''} lr {record['lr']:.2e}"
            f" | {rate} | elapsed {duration(record['elapsed_s'])} ETA {left}")


def mean_terms(records: list[dict[str, float]]) -> dict[str, float]:
    """Each named term's mean over the records that have it."""
    names = dict.fromkeys(k for r in records for k in r)
    return {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in names}


def peak_memory_per_rank() -> list[float]:
    """Peak memory of each rank in MiB: GPU memory allocated on CUDA, resident set size on CPU."""
    if torch.cuda.is_available():
        mine = torch.cuda.max_memory_allocated() / 2**20
    else:
        mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not torch.distributed.is_initialized():
        return [round(mine, 1)]
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, round(mine, 1))
    return every


def train_summary(result: dict, saved: Path, **extra: Any) -> dict:
    """What a training recipe returns and writes to ``train_summary.json``."""
    losses = result["losses"] or [None]  # none when resumed from the last step's checkpoint
    return {"steps": result["steps"], "first_loss": losses[0], "final_loss": losses[-1],
            **extra, "train_seconds": result["train_seconds"],
            "peak_memory_mb_per_rank": result["peak_memory_mb_per_rank"], "saved": str(saved)}
