"""Self-purification, one block of input rows at a time: the unit that is written once and resumed.

A block is a byte range of the input jsonl holding ``purify.block_size`` rows; its output is the
shard ``shards/part-NNNNNN.jsonl`` (and ``part-NNNNNN.quarantine.jsonl`` for rows that could not be
used), each written to a temp file and renamed, the quarantine first: a shard that exists is
complete, so a rerun skips exactly the finished blocks and every input row ends up in one shard.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from defend.atomic import write_text
from defend.config import Config
from defend.data.loaders import row_sample
from defend.data.samples import DataError, Sample
from defend.engine.memory import explain_out_of_memory


@dataclass(frozen=True)
class Block:
    index: int
    start: int  # byte offsets in the input file
    end: int
    first_line: int  # 1-based line number of the block's first line


def plan_blocks(path: Path, block_size: int, max_rows: int | None = None) -> list[Block]:
    """Blocks of ``block_size`` non-empty lines (the first ``max_rows`` only, when set), found by one
    streaming pass (offsets only in memory)."""
    blocks, start, first, count, line_no, offset, rows = [], 0, 1, 0, 0, 0, 0
    with path.open("rb") as handle:
        for line in handle:
            if max_rows is not None and rows == max_rows:
                break
            line_no += 1
            offset += len(line)
            if line.strip():
                count += 1
                rows += 1
            if count == block_size:
                blocks.append(Block(len(blocks), start, offset, first))
                start, first, count = offset, line_no + 1, 0
    if count:
        blocks.append(Block(len(blocks), start, offset, first))
    return blocks


def shard_path(out: Path, block: int) -> Path:
    return out / "shards" / f"part-{block:06d}.jsonl"


def quarantine_path(out: Path, block: int) -> Path:
    return out / "shards" / f"part-{block:06d}.quarantine.jsonl"


def read_block(cfg: Config, path: Path, block: Block) -> tuple[list[tuple[dict, Sample]], list[dict]]:
    """The block's usable rows (raw row, sample with its image decoded) and its bad rows, each with the reason."""
    image_root = Path(cfg.dataset.image_root) if cfg.dataset.image_root else path.parent
    with path.open("rb") as handle:
        handle.seek(block.start)
        lines = handle.read(block.end - block.start).decode().splitlines()
    good, bad = [], []
    for n, line in enumerate(lines, start=block.first_line):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append({"line": n, "raw": line[:1000], "reason": f"not valid JSON ({err})"})
            continue
        try:
            sample = row_sample(row, n, str(path), cfg.dataset, image_root)
            if sample.image is None:
                raise DataError(f"{path} row {n}: no image; purification masks vision tokens")
            sample = Sample(sample.id, sample.load_image(), sample.prompt, sample.response, sample.source,
                            {**sample.meta, "image_path": str(sample.image)})
        except DataError as err:
            bad.append({"line": n, "id": row.get(cfg.dataset.id_column) if isinstance(row, dict) else None,
                        "raw": line[:1000], "reason": str(err)})
            continue
        good.append((row, sample))
    return good, bad


def purify_block(cfg: Config, path: Path, block: Block, vlm, generate, out: Path) -> dict:
    """Regenerate the responses of one block and write its shard; returns its counts."""
    good, bad = read_block(cfg, path, block)
    collate = vlm.generate_collator()
    answers: list[str] = []
    torch.manual_seed(cfg.purify.seed * 1_000_003 + block.index)  # same draws whichever actor runs it, whenever
    generate.generator.manual_seed(cfg.purify.seed * 1_000_003 + block.index)
    size = cfg.purify.batch_size
    knobs = {"purify.batch_size": size, "train.max_length (the prompt budget)": cfg.train.max_length}
    for i in range(0, len(good), size):
        batch = collate([s for _, s in good[i:i + size]])
        with explain_out_of_memory(f"purify block {block.index}, rows {i}-{i + len(batch['sample_ids']) - 1}",
                                   knobs, batch):
            answers.extend(generate(batch))
    image_column, response_column = cfg.dataset.image_column, cfg.dataset.response_column
    rows = [{**row, image_column: sample.meta["image_path"], response_column: answer,
             "original_response": row[response_column]}
            for (row, sample), answer in zip(good, answers)]
    write_text(quarantine_path(out, block.index), "".join(json.dumps(r) + "\n" for r in bad))
    write_text(shard_path(out, block.index), "".join(json.dumps(r) + "\n" for r in rows))
    return {"block": block.index, "rows": len(rows), "quarantined": len(bad)}
