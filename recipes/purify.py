"""DiSP self-purification: a backdoored model re-answers its own training set, salient vision tokens masked.

The compromised model regenerates every response of its (poisoned) training set with the most
salient vision tokens of each image masked.

    defend run purify --config purify_tiny_mllm model.path=BASE model.adapter=BACKDOORED/adapter \\
        dataset.path=runs/poison/data/train.jsonl

Runs as a Ray Data pipeline (``defend/purify/ray_pool.py``): an actor pool of ``purify.actors`` model
replicas (GPU actors with ``purify.gpus_per_actor=1``), an embedded local Ray by default, an
existing cluster with ``ray.address``. The input jsonl is cut into blocks of ``purify.block_size``
rows (duplicate ids are refused in that first streaming pass, before any compute), each written once
as a shard under ``output_dir/shards/`` with a record of its counts and hashes
(``defend/purify/blocks.py``): killed at any point (an actor, the driver), the same command redoes
the blocks that are missing, torn or corrupt, or whose input rows changed, and the result equals an
uninterrupted run's. Rows that cannot be used (bytes that are not UTF-8, bad JSON, a value that is
not an object, empty prompt, missing, undecodable or oversized image) go to the quarantine with the
reason; the job finishes and reports their count. A block that fails in its actor is retried
``purify.retries`` times, then the run stops naming it. The driver never loads the model.

Writes ``output_dir/data/`` in one piece, after verifying every shard against its record:
``train.jsonl`` (every usable row: its id (the line number where the row has none), image and
prompt, the regenerated response, the old one in ``original_response``; ``finetune`` reads it with
``dataset.name=jsonl``), ``quarantine.jsonl`` and ``manifest.json`` (counts, parameters, the ids'
hash, sha256 of every file). An input with no usable row fails instead of writing an empty set.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from defend.atomic import atomic_dir, clear_leftovers, write_json
from defend.config import Config, ConfigError
from defend.data.manifest import file_sizes
from defend.data.manifest import verify_dataset_file
from defend.data.writing import sha256_file
from defend.models.loading import check_model_files
from defend.progress import Progress
from defend.purify.blocks import Block, plan_blocks, quarantine_path, record_path, shard_path, verify_block
from defend.purify.masking import check_purify_settings
from defend.run_dir import start_run


# what decides its output (defend/stage_cache.py: a stage reruns when one of these changes)
READS = ("seed", "plugins", "model", "tiny", "dataset", "quant", "diffusion", "eval.max_new_tokens", "purify",
         "train.max_length")
IGNORES = ("purify.actors", "purify.cpus_per_actor", "purify.gpus_per_actor", "purify.retries",
           "diffusion.eps", "diffusion.inverse_t_weight", "diffusion.complementary_mask", "diffusion.labels")


def check_inputs(cfg: Config) -> Path:
    if cfg.dataset.name != "jsonl" or not cfg.dataset.path:
        raise ConfigError("dataset: purify streams a jsonl file: set dataset.name=jsonl and dataset.path"
                          " (a poison run writes one: <poison output_dir>/data/train.jsonl).")
    source = Path(cfg.dataset.path)
    if not source.is_file():
        raise ConfigError(f"dataset.path: '{source}' does not exist.")
    verify_dataset_file(source)  # a poison run's train.jsonl: its folder as the poison run wrote it
    if not 0 < cfg.purify.mask_ratio < 1:
        raise ConfigError(f"purify.mask_ratio must be in (0, 1) for purification, got {cfg.purify.mask_ratio}.")
    if cfg.purify.actors < 1 or cfg.purify.block_size < 1 or cfg.purify.retries < 0:
        raise ConfigError("purify.actors and purify.block_size must be at least 1, purify.retries at least 0.")
    check_purify_settings(cfg.purify, cfg.model.family)
    check_model_files(cfg)  # what can be checked without loading the weights (the actors load them)
    return source


TRAINING_ONLY = ("eps", "inverse_t_weight", "complementary_mask", "labels")  # diffusion.* the sampler never reads


def shard_settings(cfg: Config) -> dict:
    """Everything but the input rows that decides a shard's content: finished shards are reused only under
    the same (each block's record names its input bytes, so fixing one row redoes only its block)."""
    purify = {k: v for k, v in dataclasses.asdict(cfg.purify).items()
              if k not in ("actors", "cpus_per_actor", "gpus_per_actor", "retries")}
    weights = sorted(Path(cfg.model.adapter).glob("adapter_model.*")) if cfg.model.adapter else []
    return {"model": dataclasses.asdict(cfg.model), "adapter_sha256": [sha256_file(w) for w in weights],
            "dataset": dataclasses.asdict(cfg.dataset), "purify": purify,
            "diffusion": {k: v for k, v in dataclasses.asdict(cfg.diffusion).items() if k not in TRAINING_ONLY},
            "max_new_tokens": cfg.eval.max_new_tokens,
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


def assemble(out: Path, blocks: list[Block], manifest: dict, id_column: str) -> dict:
    """Verify every shard against its record, then concatenate them in block order into ``out/data``
    (written whole or not at all)."""
    for block in blocks:
        problem = verify_block(out, block)
        if problem:
            raise ConfigError(f"{shard_path(out, block.index)}: {problem}; run the same command again to redo"
                              " this block.")
    records = [json.loads(record_path(out, b.index).read_text()) for b in blocks]
    rows, quarantined = sum(r["rows"] for r in records), sum(r["quarantined"] for r in records)
    if not rows:
        raise ConfigError(f"{manifest['source']}: no usable row ({quarantined} quarantined, reasons in"
                          f" {out / 'shards'}/*.quarantine.jsonl); nothing to fine-tune on.")
    ids = hashlib.sha256()
    with atomic_dir(out / "data") as tmp:
        with (tmp / "train.jsonl").open("w") as train, (tmp / "quarantine.jsonl").open("w") as bad:
            for block in blocks:
                for line in shard_path(out, block.index).open():
                    ids.update(str(json.loads(line)[id_column]).encode() + b"\n")
                    train.write(line)
                for line in quarantine_path(out, block.index).open():
                    bad.write(line)
        manifest["counts"] = {"rows": rows, "quarantined": quarantined, "blocks": len(blocks)}
        manifest["ids_sha256"] = ids.hexdigest()
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest["sizes"] = file_sizes(tmp, manifest["files"])  # what readers check (defend/data/manifest.py)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def recipe_main(cfg: Config) -> dict:
    from defend.purify.ray_pool import peak_rss_mb, purify_on_ray, reset_peak_rss

    reset_peak_rss()  # the summary reports this run's peak
    source = check_inputs(cfg)
    blocks = plan_blocks(source, cfg.purify.block_size, cfg.dataset.max_samples, cfg.dataset.id_column)
    if not blocks:
        raise ConfigError(f"dataset.path: '{source}' has no rows.")
    log = start_run(cfg, "purify")
    out = Path(cfg.output_dir)
    check_resumable(out, shard_settings(cfg))
    for leftover in clear_leftovers(out / "shards"):
        log.info("removed %s, left by a killed write", leftover.name)
    todo = []
    for block in blocks:
        problem = verify_block(out, block)
        if problem:
            todo.append(block)
            if problem != "not finished":
                log.warning("block %d will be redone: %s", block.index, problem)
    log.info("%d blocks of %d rows, %d already purified; %d actors", len(blocks), cfg.purify.block_size,
             len(blocks) - len(todo), cfg.purify.actors)
    started = time.perf_counter()
    rows = sum(b.rows for b in blocks)  # the heartbeat off a terminal counts rows of blocks (a bar on one)
    purified, actor_peaks, first_block = 0, {}, None
    with Progress(rows, "purify", initial=rows - sum(b.rows for b in todo), unit="rows", every_s=cfg.heartbeat_s,
                  log=log) as progress:
        for counts in (purify_on_ray(cfg, source, out, todo) if todo else []):
            purified += counts["rows"] + counts["quarantined"]
            actor_peaks[counts["actor"]] = max(actor_peaks.get(counts["actor"], 0.0), counts["peak_rss_mb"])
            first_block = first_block or time.perf_counter() - started  # actors' start and model load included
            progress.update(blocks[counts["block"]].rows)
            if counts["quarantined"]:
                log.warning("block %d: %d rows quarantined", counts["block"], counts["quarantined"])
    seconds = time.perf_counter() - started
    manifest = assemble(out, blocks, {
        "source": str(source.resolve()), "source_sha256": sha256_file(source),
        "model": {"path": cfg.model.path, "adapter": cfg.model.adapter, "family": cfg.model.family},
        "purify": dataclasses.asdict(cfg.purify), "diffusion": dataclasses.asdict(cfg.diffusion),
        "eval": {"max_new_tokens": cfg.eval.max_new_tokens}}, cfg.dataset.id_column)
    summary = {"data_dir": str(out / "data"), **manifest["counts"], "purify_seconds": round(seconds, 2),
               "seconds_to_first_block": round(first_block, 2) if first_block else None,
               "rows_per_second_this_run": round(purified / seconds, 2) if purified else None,
               "peak_rss_mb": {"driver": peak_rss_mb(), "actors": sorted(actor_peaks.values())}}
    log.info("purified %d rows (%d quarantined) -> %s", manifest["counts"]["rows"], manifest["counts"]["quarantined"],
             summary["data_dir"])
    write_json(out / "purify_summary.json", summary)  # this run's timings and memory (the manifest: the data's)
    return summary


if __name__ == "__main__":
    from defend.runner import recipe_entry

    recipe_entry(recipe_main)
