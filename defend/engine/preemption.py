"""Stop on SIGTERM / SIGUSR1 at the next step boundary, after a checkpoint (Slurm preemption, or a
scheduler's warning signal before the time limit).

A process that cannot receive the signal itself (a Ray Train worker: the signal goes to the driver,
and the recipe runs in a worker thread) gets it through a *stop source*: a function the launcher
installs with ``stop_source(poll)``, asked at every step boundary, returning the signal's name once a
stop was requested (``launchers/ray_train.py``: an actor the driver's handler sets).
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# exit status of a run stopped by a signal after saving its checkpoint (EX_TEMPFAIL: "try again")
STOPPED_EXIT_CODE = 75


class TrainingStopped(Exception):
    """A signal asked the run to stop; its state is saved in ``checkpoint``."""

    def __init__(self, step: int, checkpoint: Path, signal_name: str):
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        super().__init__(
            f"{signal_name} received: stopped after step {step}, checkpoint {checkpoint}. Run the same"
            " command again to resume from it (train.resume=auto)."
        )


_STOP_SOURCES: list[Callable[[], str | None]] = []


@contextmanager
def stop_source(poll: Callable[[], str | None]) -> Iterator[None]:
    """While active, every ``StopRequest`` in this process also asks ``poll()`` at each step boundary;
    a non-empty answer (the signal's name) counts as a received stop signal."""
    _STOP_SOURCES.append(poll)
    try:
        yield
    finally:
        _STOP_SOURCES.remove(poll)


class StopRequest:
    """Remembers a stop signal; ``requested()`` is true on every rank once any rank got one.

    Handlers are only installed from the main thread (Python's rule); elsewhere (e.g. a Ray Train
    worker thread) the launcher's stop source (``stop_source``) delivers the driver's signal.
    """

    def __init__(self, signals=STOP_SIGNALS):
        self.received: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> bool:
        import torch  # here, not at the top: the CLI imports this module and must start fast

        for poll in _STOP_SOURCES:
            if self.received:
                break
            self.received = poll() or None
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        nccl = distributed and torch.distributed.get_backend() == "nccl"
        flag = torch.tensor([1 if self.received else 0], device="cuda" if nccl else "cpu")
        if distributed:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() and not self.received:
                self.received = "a stop signal on another rank"
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
