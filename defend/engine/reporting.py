"""Where a training run's metrics go: ``train.report_to`` names reporters from this registry (HF-style).

The training loop builds one record per ``train.log_every`` steps (``{"step", "loss", "lr",
"elapsed_s", **objective terms}``) and hands it to ``Reporters.log`` on rank 0 only.

- ``jsonl``: appends the record to ``output_dir/train_log.jsonl`` (the default; what the recipes' tests
  and ``bench/`` read).
- ``tensorboard``: ``torch.utils.tensorboard`` event files under ``output_dir/tensorboard/``, one
  scalar per term as ``train/<term>`` (the ``tensorboard`` package; ``tensorboard --logdir``). A resumed
  run purges the events after its step, as the jsonl log is trimmed.
- ``wandb``: ``wandb.init(dir=output_dir)`` in offline mode unless ``WANDB_MODE`` says otherwise
  (``wandb sync output_dir/wandb/offline-run-*`` uploads it); ``WANDB_PROJECT`` names the project
  (default ``defend``), the run is named after ``output_dir``, its config is the run's ``config.yaml``.

A new destination is a class with ``log(record)`` and ``close()`` under ``@register("name")``.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from defend.config import ConfigError

REPORTERS: dict[str, type] = {}
# the package each reporter needs beyond defend's own dependencies, and how to get it
NEEDS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        REPORTERS[name] = cls
        return cls

    return add


def reporter_names(report_to: list[str] | str | None) -> list[str]:
    """``train.report_to`` as a list: a single name is one reporter, ``none`` (or ``[]``) is none."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [] if names in (["none"], ["None"]) else names


def check_report_to(report_to: list[str] | str | None) -> list[str]:
    """The reporter names, after refusing an unknown one or one whose package is not installed."""
    names = reporter_names(report_to)
    for name in names:
        if name not in REPORTERS:
            raise ConfigError(f"train.report_to: unknown reporter {name!r}; choose from {sorted(REPORTERS)}"
                              " (a list, e.g. train.report_to=[jsonl,tensorboard], or none).")
        package, install = NEEDS.get(name, (None, ""))
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(f"train.report_to: {name} needs the {package} package, which is not installed here:"
                              f" {install} (or drop {name} from train.report_to).")
    if len(set(names)) != len(names):
        raise ConfigError(f"train.report_to: {names} names a reporter twice.")
    return names


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's metrics (every number but the step and the wall time), as ``train/<name>``."""
    return {f"train/{k}": float(v) for k, v in record.items()
            if k not in ("step", "elapsed_s") and isinstance(v, (int, float)) and not isinstance(v, bool)}


@register("jsonl")
class JsonlReporter:
    def __init__(self, out: Path, log_path: Path, start_step: int):
        self.path = log_path

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


@register("tensorboard")
class TensorBoardReporter:
    def __init__(self, out: Path, log_path: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run drops what the killed one logged after its checkpoint
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # a killed job keeps what it logged

    def close(self) -> None:
        self.writer.close()


@register("wandb")
class WandbReporter:
    def __init__(self, out: Path, log_path: Path, start_step: int):
        import wandb
        import yaml

        config_file = out / "config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(out),
                              project=os.environ.get("WANDB_PROJECT", "defend"), name=out.name, config=config)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Reporters:
    """The reporters ``train.report_to`` names, opened once per training run; nothing when not ``active``
    (the ranks other than 0)."""

    def __init__(self, report_to: list[str] | str | None, log_path: Path, start_step: int = 0, active: bool = True):
        names = check_report_to(report_to) if active else []
        self.reporters = []
        try:
            for name in names:
                self.reporters.append(REPORTERS[name](log_path.parent, log_path, start_step))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.log(record)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []
