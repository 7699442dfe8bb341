"""One stage cache: (recipe, config, overrides) -> the settings that recipe reads -> a folder run once.

Every "was this already run with these settings?" of the library asks here: the demo's pre-trained bases,
the cells of ``defense_results`` (its poisoned data, shared clean fine-tune and purification folder) and
the points of ``disp_sweep``. Two caches stay their own: purify's shard check (per block, keyed on each
block's input bytes, so fixing one row redoes only its block) and the tiny models (keyed on the
builders' source). A stage's settings are:

- the config keys its recipe reads (``READS = (...)`` in the recipe file: sections or dotted keys; an
  orchestration recipe that declares none reads all), never where or how it runs (``output_dir``,
  launcher, Ray, Slurm), less those it declares do not change its output (``IGNORES``: e.g. how
  often a fine-tune logs);
- of those, only the keys whose value differs from the default config (a new key that keeps its
  default keeps the cache; a change of a default that must not reuse it bumps ``defend.__version__``);
- with every folder of ours they name fingerprinted by its content: a data folder by its manifest's
  file hashes, a LoRA adapter by its weights' sha256, a stage config passed on by name
  (``disp.finetune_config``) by its YAML's hash; so a regenerated input reruns what read it.

So editing a YAML reruns exactly the stages that read what changed, and ``slurm.time`` reruns nothing.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import defend
from defend.atomic import write_json
from defend.config import Config, ConfigError, load_config, resolve_config_path
from defend.runner import resolve_recipe

NEVER_READ = ("output_dir", "heartbeat_s", "launcher", "nproc", "ray", "slurm")


@functools.cache
def recipe_reads(recipe: str) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
    """The keys a recipe file declares it reads and ignores (``READS``, ``IGNORES``), read without importing it."""
    declared: dict[str, tuple] = {}
    for node in ast.parse(resolve_recipe(recipe).read_text()).body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if getattr(target, "id", None) in ("READS", "IGNORES"):
                    declared[target.id] = tuple(ast.literal_eval(node.value))
    return declared.get("READS"), declared.get("IGNORES", ())


def flat(settings: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in settings.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return out


@functools.cache
def _defaults() -> dict:
    return flat(dataclasses.asdict(load_config(None)))


def read_settings(recipe: str, cfg: Config) -> dict:
    """What decides ``recipe``'s output under ``cfg`` (see the module's docstring)."""
    reads, ignores = recipe_reads(recipe)

    def under(key: str, entries: tuple[str, ...]) -> bool:
        return any(key == e or key.startswith(e + ".") for e in entries)

    defaults = _defaults()
    settings = {k: named_config(v) if k.endswith("_config") else fingerprint(v)
                for k, v in flat(dataclasses.asdict(cfg)).items()
                if not under(k, NEVER_READ) and (reads is None or under(k, reads)) and not under(k, ignores)
                and (k not in defaults or defaults[k] != v)}
    return {"recipe": Path(recipe).stem, "version": defend.__version__, "settings": settings}


def stage_settings(recipe: str, config: str | None, overrides: list[str]) -> dict:
    return read_settings(recipe, load_config(config, overrides))


def settings_key(settings: Any) -> str:
    """A short name for a settings value (for folders shared by every stage with these settings)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def named_config(name: Any) -> Any:
    """A stage config an orchestration passes on by name (``disp.finetune_config``): the name and its YAML's
    hash, so editing that file reruns the stage that runs it."""
    if not isinstance(name, str) or not name:
        return name
    try:
        text = resolve_config_path(name).read_bytes()
    except ConfigError:
        return name
    return {"config": name, "yaml": hashlib.sha256(text).hexdigest()[:16]}


def fingerprint(value: Any) -> Any:
    """A setting naming a folder (or a file in one) of ours: the path and its content's hash; else itself."""
    if not isinstance(value, str) or not value or "\n" in value:
        return value
    path = Path(value)
    try:
        folder = path if path.is_dir() else path.parent if path.is_file() else None
    except OSError:  # a string that is no path (too long, say)
        return value
    if folder is None:
        return value
    manifest = folder / "manifest.json"
    if manifest.is_file():  # a data folder (poison, purify): its manifest hashes every file, images too
        files = json.loads(manifest.read_text()).get("files", {})
        return {"path": value, "data": settings_key(files)}
    weights = sorted(folder.glob("adapter_model.*"))
    if weights:  # a LoRA adapter: small, hashed whole
        return {"path": value, "adapter": files_sha256(weights)}
    return value


def files_sha256(paths: list[Path]) -> str:
    """One sha256 over the bytes of ``paths``, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def run_once(folder: Path, settings: Any, work: Callable[[Path], dict], log) -> dict:
    """``work(folder)`` once per ``settings``: a finished stage (``cell.json``) with the same settings is
    reused; a folder started under other settings is cleared first (its checkpoints must not be resumed);
    an interrupted one with these settings continues where it stopped."""
    done, started_with = folder / "cell.json", folder / "settings.json"
    finished = json.loads(done.read_text()) if done.is_file() else None
    if finished and finished["settings"] == settings:
        log.info("%s: reusing the finished stage", folder)
        return finished["metrics"]
    if folder.exists() and (not started_with.is_file() or json.loads(started_with.read_text()) != settings):
        shutil.rmtree(folder)
    write_json(started_with, settings)
    metrics = work(folder)
    write_json(done, {"settings": settings, "metrics": metrics})
    return metrics
