"""DiSP self-purification: a backdoored model re-answers its own training set, salient vision tokens masked.

The compromised model regenerates every response of its (poisoned) training set with the most
salient vision tokens of each image masked.

    defend run purify --config purify_tiny_mllm model.path=BASE model.adapter=BACKDOORED/adapter \\
        dataset.path=runs/poison/data/train.jsonl

Runs as a Ray Data pipeline (``launchers/ray_purify.py``): an actor pool of ``purify.actors`` model
replicas (GPU actors with ``purify.gpus_per_actor=1``), an embedded local Ray by default, an
existing cluster with ``ray.address``. The input jsonl is cut into blocks of ``purify.block_size``
rows, each written once as a shard under ``output_dir/shards/``: killed at any point (an actor, the
driver), the same command continues with the missing blocks, and the result equals an
uninterrupted run's. Rows that cannot be used (bad JSON, empty prompt, missing or undecodable image)
go to the quarantine with the reason; the job finishes and reports their count.

Writes ``output_dir/data/`` in one piece: ``train.jsonl`` (every usable row: same id, image and
prompt, the regenerated response, the old one in ``original_response``; ``finetune`` reads it with
``dataset.name=jsonl``), ``quarantine.jsonl`` and ``manifest.json`` (counts, parameters, the ids'
hash, sha256 of every file).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from tqdm import tqdm

from defend.atomic import atomic_dir, write_json
from defend.config import Config, ConfigError
from defend.data.writing import sha256_file
from defend.models import load_model
from defend.purify.blocks import plan_blocks, quarantine_path, shard_path
from defend.purify.masking import MaskedGenerator
from defend.run_dir import start_run


def check_inputs(cfg: Config) -> Path:
    if cfg.dataset.name != "jsonl" or not cfg.dataset.path:
        raise ConfigError("dataset: purify streams a jsonl file: set dataset.name=jsonl and dataset.path"
                          " (a poison run writes one: <poison output_dir>/data/train.jsonl).")
    source = Path(cfg.dataset.path)
    if not source.is_file():
        raise ConfigError(f"dataset.path: '{source}' does not exist.")
    if not 0 < cfg.purify.mask_ratio < 1:
        raise ConfigError(f"purify.mask_ratio must be in (0, 1) for purification, got {cfg.purify.mask_ratio}.")
    if cfg.purify.actors < 1 or cfg.purify.block_size < 1:
        raise ConfigError("purify.actors and purify.block_size must be at least 1.")
    try:  # a model that cannot load fails here, once, not in every actor
        MaskedGenerator(load_model(cfg), cfg.purify)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path / model.adapter: cannot load the model to purify with ({err}).") from err
    return source


def shard_settings(cfg: Config, source: Path) -> dict:
    """Everything that decides a shard's content: finished shards are reused only under the same."""
    stat = source.stat()
    purify = {k: v for k, v in dataclasses.asdict(cfg.purify).items() if k not in ("actors", "cpus_per_actor", "gpus_per_actor")}
    weights = sorted(Path(cfg.model.adapter).glob("adapter_model.*")) if cfg.model.adapter else []
    return {"source": {"path": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns},
            "model": dataclasses.asdict(cfg.model), "adapter_sha256": [sha256_file(w) for w in weights],
            "dataset": dataclasses.asdict(cfg.dataset), "purify": purify,
            "diffusion": dataclasses.asdict(cfg.diffusion), "max_new_tokens": cfg.eval.max_new_tokens,
            "max_length": cfg.train.max_length}


def check_resumable(out: Path, settings: dict) -> None:
    """Record the settings beside the shards, or refuse to mix shards made under other settings."""
    recorded = out / "shards" / "settings.json"
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        if before != settings:
            changed = sorted(k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k))
            raise ConfigError(f"{out / 'shards'} holds blocks purified with other settings (changed: {', '.join(changed)})."
                              " Use another output_dir, or delete that folder to start over.")
    elif any((out / "shards").glob("part-*.jsonl")):
        raise ConfigError(f"{out / 'shards'} holds blocks of unknown settings (no settings.json); delete it to start over.")
    else:
        write_json(recorded, settings)


def assemble(out: Path, n_blocks: int, manifest: dict) -> dict:
    """Concatenate the shards in block order into ``out/data`` (written whole or not at all)."""
    ids = hashlib.sha256()
    rows = quarantined = 0
    seen: set[str] = set()
    with atomic_dir(out / "data") as tmp:
        with (tmp / "train.jsonl").open("w") as train, (tmp / "quarantine.jsonl").open("w") as bad:
            for block in range(n_blocks):
                for line in shard_path(out, block).open():
                    row_id = str(json.loads(line)["id"])
                    if row_id in seen:
                        raise ConfigError(f"{shard_path(out, block)}: id '{row_id}' appears twice in the input;"
                                          " purification needs unique ids.")
                    seen.add(row_id)
                    ids.update(row_id.encode() + b"\n")
                    train.write(line)
                    rows += 1
                for line in quarantine_path(out, block).open():
                    bad.write(line)
                    quarantined += 1
        manifest["counts"] = {"rows": rows, "quarantined": quarantined, "blocks": n_blocks}
        manifest["ids_sha256"] = ids.hexdigest()
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / "manifest.json", manifest)
    return manifest


def recipe_main(cfg: Config) -> dict:
    from launchers.ray_purify import peak_rss_mb, purify_on_ray

    source = check_inputs(cfg)
    log = start_run(cfg, "purify")
    out = Path(cfg.output_dir)
    check_resumable(out, shard_settings(cfg, source))
    blocks = plan_blocks(source, cfg.purify.block_size, cfg.dataset.max_samples)
    todo = [b for b in blocks if not shard_path(out, b.index).is_file()]
    log.info("%d blocks of %d rows, %d already purified; %d actors", len(blocks), cfg.purify.block_size,
             len(blocks) - len(todo), cfg.purify.actors)
    started = time.perf_counter()
    progress = tqdm(total=len(blocks), initial=len(blocks) - len(todo), desc="purify blocks")
    purified, actor_peaks, first_block = 0, {}, None
    for counts in (purify_on_ray(cfg, source, out, todo) if todo else []):
        purified += counts["rows"] + counts["quarantined"]
        actor_peaks[counts["actor"]] = max(actor_peaks.get(counts["actor"], 0.0), counts["peak_rss_mb"])
        first_block = first_block or time.perf_counter() - started  # actors' start and model load included
        progress.update(1)
        if counts["quarantined"]:
            log.warning("block %d: %d rows quarantined", counts["block"], counts["quarantined"])
    progress.close()
    seconds = time.perf_counter() - started
    manifest = assemble(out, len(blocks), {
        "source": str(source.resolve()), "source_sha256": sha256_file(source),
        "model": {"path": cfg.model.path, "adapter": cfg.model.adapter, "family": cfg.model.family},
        "purify": dataclasses.asdict(cfg.purify), "diffusion": dataclasses.asdict(cfg.diffusion),
        "eval": {"max_new_tokens": cfg.eval.max_new_tokens}})
    summary = {"data_dir": str(out / "data"), **manifest["counts"], "purify_seconds": round(seconds, 2),
               "seconds_to_first_block": round(first_block, 2) if first_block else None,
               "rows_per_second_this_run": round(purified / seconds, 2) if purified else None,
               "peak_rss_mb": {"driver": peak_rss_mb(), "actors": sorted(actor_peaks.values())}}
    log.info("purified %d rows (%d quarantined) -> %s", manifest["counts"]["rows"], manifest["counts"]["quarantined"],
             summary["data_dir"])
    write_json(out / "purify_summary.json", summary)  # this run's timings and memory (the manifest: the data's)
    return summary


if __name__ == "__main__":
    from defend.cli import recipe_entry

    recipe_entry(recipe_main)
