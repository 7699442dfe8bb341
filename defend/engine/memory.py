"""Out-of-memory failures as messages that name the setting to change, never a bare allocator error."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from defend.config import ConfigError

# what the CPU allocator and CUDA say when an allocation fails
OOM_MARKERS = ("out of memory", "can't allocate memory", "not enough memory")


class OutOfMemory(ConfigError):
    """A batch did not fit the device: the message names the knobs that shrink it."""


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in OOM_MARKERS))


@contextmanager
def explain_out_of_memory(what: str, knobs: dict[str, object], batch: dict | None = None,
                          also: str = "") -> Iterator[None]:
    """Re-raise an out-of-memory error inside the block as ``OutOfMemory`` naming ``what`` ran out,
    the batch's shape and the ``knobs`` (config keys with their values) that make it smaller; ``also``:
    other remedies."""
    try:
        yield
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        shape = ""
        if batch is not None and torch.is_tensor(batch.get("input_ids")):
            rows, tokens = batch["input_ids"].shape
            shape = f" (a batch of {rows} rows x {tokens} tokens)"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        settings = ", ".join(f"{key} (now {value})" for key, value in knobs.items())
        remedies = f"lower {settings}" + (f"; or {also}" if also else "")
        raise OutOfMemory(f"{what} ran out of memory{shape}: {remedies}. The allocator said:"
                          f" {str(err).splitlines()[0][:300]}") from err
