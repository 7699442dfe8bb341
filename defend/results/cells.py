"""The cells of one ``defense_results`` run and running them: one at a time in this process, or
``results.workers`` at once, each cell in a worker process, in the order their inputs allow.

A cell's kind names the ``Stages`` method that runs it; ``after`` names the cells it needs finished
first: a defense that starts from the victim (purified, from_victim) needs the victim's adapter, the
defenses of one victim that share its purification run one after another, and so do the clean
fine-tunes of one task and family (they share one trained folder when their settings agree)."""
from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from defend.config import Config
from defend.results.stages import Stages, Victim
from defend.run_dir import LOG_FORMAT


@dataclass(frozen=True)
class Cell:
    """One row of the results: ``kind`` (base | clean | victim | purified | from_victim) of ``defense``
    on ``victim``, kept in ``folder``."""

    folder: Path
    kind: str
    defense: str
    victim: Victim
    overrides: tuple[str, ...] = ()  # the defense's overrides of its fine-tune
    data: tuple[str, ...] = ()  # clean / from_victim: the dataset overrides of the rows they train on
    after: tuple[Path, ...] = ()  # folders of the cells that must finish first

    @property
    def starts_from(self) -> Path | None:
        """The undefended victim's folder, for the kinds that read its adapter (purified, from_victim)."""
        return self.folder.parent / "none" if self.kind in ("purified", "from_victim") else None

    def run(self, stages: Stages, log) -> dict:
        v, undefended = self.victim, self.starts_from
        if self.kind == "base":
            return stages.base_cell(self.folder, v, log)
        if self.kind == "clean":
            shared = self.folder.parents[2] / "clean_finetune"  # <task>/<family>/clean_finetune-<settings>
            return stages.clean_cell(self.folder, v, shared, list(self.data), log)
        if self.kind == "purified":
            return stages.purified_cell(self.folder, v, undefended, list(self.overrides), log)
        if self.kind == "from_victim":
            return stages.from_victim_cell(self.folder, v, undefended, list(self.data), list(self.overrides), log)
        return stages.victim_cell(self.folder, v, list(self.overrides), log)


def victim_cells(cfg: Config, v: Victim, folder: Path, clean: list[str], subset: list[str], first_seed: bool,
                 previous: list[Cell]) -> list[Cell]:
    """The cells of one victim (task, family, attack, seed) in ``folder``: the references (first seed),
    then each defense, the undefended victim first. ``previous``: the run's cells so far (for ``after``)."""
    r = cfg.results
    cells = []
    if r.references and first_seed:
        cleans = [c.folder for c in previous if c.kind == "clean" and c.victim.task == v.task
                  and c.victim.family == v.family]
        cells += [Cell(folder / "base", "base", "base", v),
                  Cell(folder / "clean", "clean", "clean", v, data=tuple(clean), after=tuple(cleans[-1:]))]
    undefended = folder / "none"
    for defense in ["none", *(d for d in r.defenses if d != "none")]:
        overrides = tuple(r.defenses[defense])
        if defense in r.purified:  # after the victim, and after the defense before it that shares its purification
            shared = [c.folder for c in cells if c.kind == "purified"]
            cells.append(Cell(folder / defense, "purified", defense, v, overrides, after=(undefended, *shared[-1:])))
        elif defense in r.from_victim:
            cells.append(Cell(folder / defense, "from_victim", defense, v, overrides, tuple(subset), (undefended,)))
        else:
            cells.append(Cell(folder / defense, "victim", defense, v, overrides))
    return cells


def run_cells(cfg: Config, cells: list[Cell], log, known: dict[Path, dict] | None = None,
              on_done: Callable[[Cell, dict], None] | None = None) -> dict[Path, dict]:
    """Every cell's metrics (folder -> metrics): ``known`` as given, the others run ``results.workers`` at a
    time, ``on_done`` called as each finishes. A failed cell stops the run (cells already finished are kept:
    a rerun reuses them)."""
    done = dict(known or {})
    todo = [c for c in cells if c.folder not in done]
    workers = min(cfg.results.workers, len(todo)) or 1
    started = time.perf_counter()
    if done:
        log.info("%d of %d cells already finished (the ledger)", len(done), len(cells))

    def finished(cell: Cell, metrics: dict) -> None:
        done[cell.folder] = metrics
        if on_done:
            on_done(cell, metrics)
        log.info("cell %d/%d done: %s (%.0f s into the run)", len(done), len(cells),
                 cell.folder.relative_to(Path(cfg.output_dir)), time.perf_counter() - started)

    if workers == 1:
        stages = Stages(cfg)
        for cell in todo:
            finished(cell, cell.run(stages, log))
        return done
    threads = _threads_per_worker(workers)
    log.info("running %d cells, %d at a time (each in its own process, %s threads; its log beside its folder)",
             len(todo), workers, threads)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch or Ray state inherited
    workers_log = Path(cfg.output_dir) / "workers.log"  # what the workers print outside a cell (C libraries' notes)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(threads, str(workers_log))) as pool:
        waiting, running = list(todo), {}
        while waiting or running:
            for cell in [c for c in waiting if all(a in done for a in c.after)]:
                waiting.remove(cell)
                running[pool.submit(_run_in_worker, cfg, cell)] = cell
            if not running:  # cannot happen for cells made by victim_cells; a clear stop if it ever does
                raise RuntimeError(f"results cells wait on cells that never run: {[str(c.folder) for c in waiting]}")
            ready, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ready:
                cell = running.pop(future)
                try:
                    metrics = future.result()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    log.error("cell %s failed; its log: %s (and %s)", cell.folder, _log_path(cell), workers_log)
                    raise
                finished(cell, metrics)
    return done


def _threads_per_worker(workers: int) -> str:
    """cores // workers, or fewer where OMP_NUM_THREADS says so (a run's own thread count is the ceiling)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cores // workers)
    given = os.environ.get("OMP_NUM_THREADS", "")
    return str(min(share, int(given)) if given.isdigit() and int(given) > 0 else share)


def _start_worker(threads: str, log: str) -> None:
    os.environ["OMP_NUM_THREADS"] = threads  # before torch is imported in this process
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)  # e.g. DeepSpeed's op probe ("cannot find -laio") at import, Ray's C++ lines
    os.dup2(fd, 2)
    os.close(fd)


def _log_path(cell: Cell) -> Path:
    return cell.folder.with_name(f"{cell.folder.name}.log")


def _run_in_worker(cfg: Config, cell: Cell) -> dict:
    """A cell in a worker process, its output (the stages' logs and progress) into ``<folder>.log``."""
    path = _log_path(cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        log = logging.getLogger("defend.defense_results.cell")
        log.setLevel(logging.INFO)
        log.propagate = False
        log.handlers = [logging.StreamHandler(sys.stderr)]
        log.handlers[0].setFormatter(logging.Formatter(LOG_FORMAT))
        return cell.run(Stages(cfg), log)
