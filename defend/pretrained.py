"""Pre-trained tiny bases for the demo and the defense results: run a chain of recipe stages once,
cache the result keyed by the settings the stages read (defend/stage_cache.py), reuse it on the next run."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from defend.atomic import atomic_dir
from defend.config import Config
from defend.models.tiny import TINY_PATH, cache_root
from defend.runner import run_recipe
from defend.stage_cache import settings_key, stage_settings


def stage_key(*stages: tuple[str, str, list[str]]) -> str:
    """Cache key of a chain of stages: (recipe, config, overrides) each, by the settings each recipe reads."""
    return settings_key([stage_settings(*stage) for stage in stages])


def cached_stages(cfg: Config, name: str, stages: list[tuple[str, str, list[str]]], out: Path, log) -> tuple[Path, float]:
    """Run ``stages`` in order (each from the previous one's model), or reuse their cached result."""
    cached = cache_root() / "pretrained" / f"{name}-{stage_key(*stages)}"
    if cfg.demo.reuse_pretrained and (cached / "config.json").is_file():
        log.info("%s: reusing the pre-trained model cached at %s", name, cached)
        return cached, 0.0
    started = time.perf_counter()
    model_path: list[str] = []  # the first stage starts from its own model.path
    for n, (recipe, config, overrides) in enumerate(stages):
        summary = run_recipe(recipe, config, [*overrides, f"output_dir={out / f'{name}{n}'}", *model_path])
        model_path = [f"model.path={summary['saved']}"]
    with atomic_dir(cached) as tmp:
        shutil.copytree(summary["saved"], tmp, dirs_exist_ok=True)
    return cached, time.perf_counter() - started


def vision_stages(cfg: Config) -> list[tuple[str, str, list[str]]]:
    """The shared vision encoder's stage (``demo.vision_config``), or none."""
    if not cfg.demo.vision_config:
        return []
    return [("pretrain_vision", cfg.demo.vision_config, [f"seed={cfg.seed}", f"tiny.arch={cfg.tiny.arch}"])]


def family_stages(cfg: Config, family: str, encoder: Path | None) -> list[tuple[str, str, list[str]]]:
    """``family``'s own language stages (``demo.pretrain_configs``), the first starting from ``encoder``."""
    common = [f"seed={cfg.seed}", f"tiny.arch={cfg.tiny.arch}", f"model.family={family}"]
    vision = [f"model.vision_tower_from={encoder}"] if encoder else []
    return [("finetune", name.format(family=family), [*common, *(vision if n == 0 else [])])
            for n, name in enumerate(cfg.demo.pretrain_configs)]


def base_recipe_key(cfg: Config, family: str) -> str:
    """What ``family``'s base is made from, the same on every machine: the settings of its whole chain of
    stages (the encoder's stage in place of the cached encoder's path, which differs between machines)."""
    return stage_key(*vision_stages(cfg), *family_stages(cfg, family, None))


def pretrained_bases(cfg: Config, out: Path, log, families: list[str] | None = None) -> tuple[dict[str, Path], dict[str, float]]:
    """Each family's pre-trained base (``families``, default ``demo.families``): one vision encoder for
    all (``demo.vision_config``), then each family's own language stages (``demo.pretrain_configs``),
    on the tiny architecture ``tiny.arch``; a real ``model.path`` is every family's base as it is."""
    families = families or cfg.demo.families
    if cfg.model.path and cfg.model.path != TINY_PATH:
        log.info("bases: %s as given (model.path), nothing to pre-train", cfg.model.path)
        return {family: Path(cfg.model.path) for family in families}, {}
    encoder, seconds = None, {}
    if stages := vision_stages(cfg):
        encoder, seconds["vision"] = cached_stages(cfg, "vision", stages, out, log)
    bases = {}
    for family in families:
        bases[family], seconds[family] = cached_stages(cfg, family, family_stages(cfg, family, encoder),
                                                       out / family, log)
    return bases, seconds
