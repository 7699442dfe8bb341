"""The ledger: every finished results cell's metrics, kept beside the report (``results_cells.json`` in
``results.docs_dir``) and committed with it, so a run spread over machines or sessions that do not
keep ``output_dir`` goes on where the last one stopped.

A cell's ``cell.json`` is keyed on the settings of the runs it made, with the adapters it read hashed
by their bytes; on a fresh machine those adapters do not exist. The ledger keys a cell on what it is
made from instead: its kind, defense and overrides, its victim (task, family, attack, seed), the
base's weights (their sha256: the same settings pre-trained on another thread count give another
model, docs/demo.md), the poisoned data's file hashes, the stage configs' YAML hashes and every
override list the run passes its stages. Same inputs, same cell: the same trust ``cell.json`` puts
in a rerun.
A ledger cell whose outputs a cell still to run reads (the victim's adapter, for disp and clean_tune)
is run again instead.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import defend
from defend.atomic import write_json
from defend.config import Config
from defend.results.cells import Cell
from defend.results.stages import Stages
from defend.stage_cache import files_sha256, fingerprint, named_config, settings_key

LEDGER = "results_cells.json"  # in results.docs_dir


@functools.cache
def weights_digest(folder: Path) -> str:
    """sha256 of a model folder's weight files (a tiny base: a few MB)."""
    return files_sha256(sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")))


def cell_keys(cfg: Config, cells: list[Cell]) -> dict[Path, str]:
    """Each cell's folder -> what it is made from (see the module's docstring), as a short hash."""
    stages, poison = Stages(cfg), functools.cache(lambda folder: fingerprint(folder)["data"])
    return {c.folder: cell_key(cfg, stages, c, poison(c.victim.poison_dir)) for c in cells}


def cell_key(cfg: Config, stages: Stages, cell: Cell, poison: str) -> str:
    r, v = cfg.results, cell.victim
    inputs = {
        "version": defend.__version__, "kind": cell.kind, "defense": cell.defense, "overrides": list(cell.overrides),
        "data": list(cell.data), "victim": [v.task, v.family, v.attack, v.seed], "base": weights_digest(Path(v.base)),
        "poison": poison,  # the poisoned data folder's file hashes (verified when it was made)
        "finetune_config": named_config(stages.finetune_config(v.family)),
        "evaluate_config": named_config(stages.evaluate_config(v.family)),
        "family_overrides": cfg.demo.finetune_overrides.get(v.family, []), "eval_overrides": r.eval_overrides,
        "stage_overrides": {s: stages.overrides(v, s) for s in ("finetune_overrides", "evaluate_overrides")},
    }
    if cell.kind == "purified":
        inputs["disp_config"] = named_config(r.disp_config)
    return settings_key(inputs)


class Ledger:
    """``path`` (a JSON object: cell key -> the cell's folder in the run and its metrics)."""

    def __init__(self, path: Path):
        self.path = path
        self.cells = json.loads(path.read_text()) if path.is_file() else {}

    def metrics(self, key: str) -> dict | None:
        entry = self.cells.get(key)
        return entry["metrics"] if entry else None

    def add(self, key: str, folder: str, metrics: dict) -> None:
        self.cells[key] = {"cell": folder, "metrics": metrics}
        write_json(self.path, self.cells)  # atomic: a killed run leaves the ledger as it was

    def keep(self, keys: set[str]) -> None:
        """Forget the cells of other settings (at the end of a run, as its results.json does)."""
        if set(self.cells) - keys:
            self.cells = {k: v for k, v in self.cells.items() if k in keys}
            write_json(self.path, self.cells)


def cells_to_run(cells: list[Cell], keys: dict[Path, str], ledger: Ledger) -> list[Cell]:
    """The cells the ledger cannot answer: those not in it, and the victims a cell among them starts from."""
    missing = {c.folder for c in cells if ledger.metrics(keys[c.folder]) is None}
    needed = {c.starts_from for c in cells if c.folder in missing and c.starts_from}
    return [c for c in cells if c.folder in missing | needed]
