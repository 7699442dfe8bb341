"""The results' pre-trained bases, kept beside the report (``results.bases_dir``, by default
``results_bases/<family>`` in ``results.docs_dir``) and committed with it and the ledger.

The ledger keys every cell on its base's weights, and pre-training the same settings on another machine
(another CPU's kernels, another thread count) gives other weights: without the bases themselves, a run
spread over sessions on different machines would reuse nothing. So the run trains on the kept bases
while their recorded recipe (``base.json``: ``base_recipe_key``, the settings of the whole pre-training
chain) is what the config asks for, and pre-trains and keeps new ones when it is not. A tiny base is a
few MB; a real ``model.path`` is used as it is and never copied.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from defend.atomic import atomic_dir, write_json
from defend.config import Config
from defend.models.tiny import TINY_PATH
from defend.pretrained import base_recipe_key, pretrained_bases

BASES = "results_bases"  # in results.docs_dir
RECIPE = "base.json"  # in each kept base: what it was pre-trained from


def kept_recipe(folder: Path) -> str | None:
    path = folder / RECIPE
    return json.loads(path.read_text())["recipe_key"] if path.is_file() else None


def bases_dir(cfg: Config) -> Path:
    return Path(cfg.results.bases_dir or Path(cfg.results.docs_dir) / BASES)


def results_bases(cfg: Config, out: Path, log) -> dict[str, Path]:
    """Each of ``results.families``' base: the one kept in ``bases_dir`` when its recipe is this config's,
    else pre-trained (the demo's cache, ``out``) and kept there."""
    families = cfg.results.families
    if cfg.model.path and cfg.model.path != TINY_PATH:
        return pretrained_bases(cfg, out, log, families=families)[0]
    wanted = {family: base_recipe_key(cfg, family) for family in families}
    kept = {family: bases_dir(cfg) / family for family in families}
    stale = [family for family in families if kept_recipe(kept[family]) != wanted[family]]
    for family in families:
        if family not in stale:
            log.info("%s: the base kept at %s", family, kept[family])
    if stale:
        made, _ = pretrained_bases(cfg, out, log, families=stale)
        for family in stale:
            with atomic_dir(kept[family]) as tmp:
                shutil.copytree(made[family], tmp, dirs_exist_ok=True)
                write_json(tmp / RECIPE, {"recipe_key": wanted[family], "pre_trained_at": str(made[family])})
            log.info("%s: pre-trained base kept at %s (commit it with the report)", family, kept[family])
    return kept
