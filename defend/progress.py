"""Progress that suits where it is read: a tqdm bar on a terminal, plain log lines in a batch job's log.

The rule, in one place: when stderr is a terminal, a bar (redrawn in place); otherwise no bar (its
carriage-return redraws would fill a Slurm or ``make demo`` log), and a heartbeat line every
``every_s`` seconds (the ``heartbeat_s`` key) with items done / total, rate and ETA, plus one when the
work ends. Training logs its own line per ``train.log_every`` steps (``defend/engine/loop.py``), so its
progress is a bar on a terminal and nothing else.

    with Progress(len(rows), "evaluate (clean)", unit="rows", every_s=cfg.heartbeat_s, log=log) as progress:
        for batch in batches:
            ...
            progress.update(len(batch))
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (default: stderr, where the bar and the log go) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def eta(done: float, total: float, elapsed: float) -> str:
    """Time left at the rate so far, or ``?`` before anything is done."""
    if done <= 0 or elapsed <= 0:
        return "?"
    return duration((total - done) * elapsed / done)


def quiet_library_bars() -> None:
    """Off a terminal, turn off the bars of the libraries defend drives (transformers' "Loading weights",
    huggingface_hub's and datasets' downloads and maps): the same rule for their bars as for ours."""
    if on_terminal():
        return
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:  # read when datasets is first imported
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def _default_logger() -> logging.Logger:
    logger = logging.getLogger("defend.progress")
    if not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return logger


class Progress:
    """``total`` items of work, ``initial`` of them already done (a resumed job).

    A bar when ``bar`` is true (default: stderr is a terminal); otherwise, with ``every_s`` > 0, a
    heartbeat thread logs ``desc: done/total unit, rate, elapsed, ETA`` every ``every_s`` seconds (also
    while one item takes longer than that) and a last line on ``close``. ``enabled=False`` (ranks
    other than 0) shows nothing. ``update(n, **postfix)`` counts ``n`` more items (postfix: the bar's
    right-hand fields, e.g. the loss).
    """

    def __init__(self, total: int | None, desc: str, *, initial: int = 0, unit: str = "it",
                 every_s: float | None = 60.0, log: logging.Logger | None = None, enabled: bool = True,
                 bar: bool | None = None):
        self.total, self.desc, self.unit, self.initial, self.done = total, desc, unit, initial, initial
        self.log = log or _default_logger()
        self.started = time.perf_counter()
        self.bar = None
        self._stop = threading.Event()
        self._thread = None
        if not enabled:
            return
        if on_terminal() if bar is None else bar:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit)
        elif every_s and every_s > 0:
            self._thread = threading.Thread(target=self._beat, args=(every_s,), name=f"heartbeat {desc}", daemon=True)
            self._thread.start()

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)

    def line(self) -> str:
        """``purify blocks: 3/10 blocks, 0.52 blocks/s, elapsed 5s, ETA 13s`` (rate and ETA of this run)."""
        elapsed = time.perf_counter() - self.started
        ran = self.done - self.initial
        rate = ran / elapsed if elapsed > 0 else 0.0
        of = f"/{self.total}" if self.total is not None else ""
        left = f", ETA {eta(ran, self.total - self.initial, elapsed)}" if self.total is not None else ""
        return f"{self.desc}: {self.done}{of} {self.unit}, {rate:.3g} {self.unit}/s, elapsed {duration(elapsed)}{left}"

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.log.info("%s", self.line())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.log.info("%s (done)" if self.total is None or self.done >= self.total else "%s (stopped)", self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, *, total: int | None = None, **kwargs: Any) -> Iterator[T]:
    """``items`` counted one by one through a ``Progress`` (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, **kwargs) as progress:
        for item in items:
            yield item
            progress.update(1)
