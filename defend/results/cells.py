"""Results recipes' cells: a unit of work run once per settings, reused when a rerun asks for the same."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from defend.atomic import write_json


def run_cell(folder: Path, settings, work: Callable[[Path], dict], log) -> dict:
    """``work(folder)`` once per ``settings``: a finished cell (``cell.json``) with the same settings
    is reused; a folder started under other settings is cleared first (its checkpoints must not be
    resumed); an interrupted cell with these settings continues where it stopped."""
    done, started_with = folder / "cell.json", folder / "settings.json"
    finished = json.loads(done.read_text()) if done.is_file() else None
    if finished and finished["settings"] == settings:
        log.info("%s: reusing the finished cell", folder)
        return finished["metrics"]
    if folder.exists() and (not started_with.is_file() or json.loads(started_with.read_text()) != settings):
        shutil.rmtree(folder)
    write_json(started_with, settings)
    metrics = work(folder)
    write_json(done, {"settings": settings, "metrics": metrics})
    return metrics
