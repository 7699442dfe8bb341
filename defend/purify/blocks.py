"""Self-purification, one block of input rows at a time: the unit that is written once, verified and resumed.

A block is a byte range of the input jsonl holding ``purify.block_size`` rows (lines end at ``\\n``
only: a U+2028 inside a JSON string is part of its row). Its output is the shard
``shards/part-NNNNNN.jsonl``, the rows that could not be used ``part-NNNNNN.quarantine.jsonl``, and
last its record ``part-NNNNNN.done.json``: the block's input rows and the sha256 of its input bytes,
its output and quarantined rows and both files' sha256. A block is finished when its record exists,
names the same input bytes, and both files still match it (``verify_block``), so a rerun redoes
exactly the blocks that are missing, torn, corrupt or whose input changed, and every input row ends
up in one shard or the quarantine.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from defend.atomic import write_json, write_text
from defend.config import Config, ConfigError
from defend.data.loaders import row_sample
from defend.data.samples import DataError, Sample
from defend.data.writing import sha256_file
from defend.engine.memory import explain_out_of_memory
from defend.seeds import derive_seed


@dataclass(frozen=True)
class Block:
    index: int
    start: int  # byte offsets in the input file
    end: int
    first_line: int  # 1-based line number of the block's first line
    rows: int = 0  # non-empty lines
    sha256: str = ""  # of the block's input bytes


def row_id(line: bytes, number: int, id_column: str) -> str | None:
    """The id a row will have (its ``id_column``, else its line number); None for a row that will be
    quarantined anyway (not UTF-8, not a JSON object)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(row, dict):
        return None
    return str(row.get(id_column, number))


def plan_blocks(path: Path, block_size: int, max_rows: int | None = None, id_column: str = "id") -> list[Block]:
    """Blocks of ``block_size`` non-empty lines (the first ``max_rows`` only, when set), found by one
    streaming pass, which also refuses duplicate ids before any compute (ids are kept as 8-byte hashes)."""
    blocks, start, first, count, line_no, offset, rows = [], 0, 1, 0, 0, 0, 0
    digest = hashlib.sha256()
    seen: dict[int, int] = {}
    with path.open("rb") as handle:
        for line in handle:  # binary lines split at b"\n" only
            if max_rows is not None and rows == max_rows:
                break
            line_no += 1
            offset += len(line)
            digest.update(line)
            if line.strip():
                count += 1
                rows += 1
                found = row_id(line, line_no, id_column)
                if found is not None:
                    key = int.from_bytes(hashlib.blake2b(found.encode(), digest_size=8).digest(), "big")
                    if key in seen:
                        raise ConfigError(f"{path}: lines {seen[key]} and {line_no} have the same"
                                          f" {id_column} '{found}'; purification needs unique ids"
                                          " (dataset.id_column names the column).")
                    seen[key] = line_no
            if count == block_size:
                blocks.append(Block(len(blocks), start, offset, first, count, digest.hexdigest()))
                start, first, count, digest = offset, line_no + 1, 0, hashlib.sha256()
    if count:
        blocks.append(Block(len(blocks), start, offset, first, count, digest.hexdigest()))
    return blocks


def shard_path(out: Path, block: int) -> Path:
    return out / "shards" / f"part-{block:06d}.jsonl"


def quarantine_path(out: Path, block: int) -> Path:
    return out / "shards" / f"part-{block:06d}.quarantine.jsonl"


def record_path(out: Path, block: int) -> Path:
    return out / "shards" / f"part-{block:06d}.done.json"


def verify_block(out: Path, block: Block) -> str | None:
    """Why block ``block``'s output cannot be used (None: it is finished and intact)."""
    record = record_path(out, block.index)
    if not record.is_file():
        return "not finished"
    try:
        done = json.loads(record.read_text())
    except json.JSONDecodeError:
        return f"{record.name} is torn"
    if done.get("input_sha256") != block.sha256 or done.get("input_rows") != block.rows:
        return "its input rows changed"
    if done["rows"] + done["quarantined"] != block.rows:
        return f"{record.name}: {done['rows']} + {done['quarantined']} rows for {block.rows} input rows"
    for name, path in (("shard", shard_path(out, block.index)), ("quarantine", quarantine_path(out, block.index))):
        if not path.is_file():
            return f"{path.name} is missing"
        if sha256_file(path) != done[f"{name}_sha256"]:
            return f"{path.name} does not match its record (corrupt or truncated)"
    return None


def read_block(cfg: Config, path: Path, block: Block) -> tuple[list[tuple[dict, Sample]], list[dict]]:
    """The block's usable rows (raw row, sample with its image decoded) and its bad rows, each with the
    reason: whatever is wrong with one row (bytes, JSON, fields, image) quarantines that row only."""
    image_root = Path(cfg.dataset.image_root) if cfg.dataset.image_root else path.parent
    with path.open("rb") as handle:
        handle.seek(block.start)
        lines = handle.read(block.end - block.start).split(b"\n")
    good, bad = [], []
    for n, raw in enumerate(lines, start=block.first_line):
        if not raw.strip():
            continue
        text = raw.decode("utf-8", errors="replace")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.append({"line": n, "raw": text[:1000], "reason": f"not UTF-8 ({err})"})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append({"line": n, "raw": line[:1000], "reason": f"not valid JSON ({err})"})
            continue
        if not isinstance(row, dict):
            bad.append({"line": n, "raw": line[:1000], "reason": f"a JSON {type(row).__name__}, not an object"})
            continue
        try:
            sample = row_sample(row, n, str(path), cfg.dataset, image_root)
            if sample.image is None:
                raise DataError(f"{path} row {n}: no image; purification masks vision tokens")
            sample = Sample(sample.id, sample.load_image(), sample.prompt, sample.response, sample.source,
                            {**sample.meta, "image_path": str(sample.image)})
        except Exception as err:  # noqa: BLE001 - any failure of one row's fields or image is that row's
            reason = str(err) if isinstance(err, DataError) else f"{path} row {n}: {type(err).__name__}: {err}"
            bad.append({"line": n, "id": row.get(cfg.dataset.id_column), "raw": line[:1000], "reason": reason})
            continue
        good.append((row, sample))
    return good, bad


def purify_block(cfg: Config, path: Path, block: Block, vlm, generate, out: Path) -> dict:
    """Regenerate the responses of one block, write its shard, quarantine and record; returns its counts."""
    good, bad = read_block(cfg, path, block)
    collate = vlm.generate_collator()
    answers: list[str] = []
    seed = derive_seed(cfg.purify.seed, block.index)  # the same draws whichever actor runs it, whenever
    torch.manual_seed(seed)
    generate.generator.manual_seed(seed)
    size = cfg.purify.batch_size
    knobs = {"purify.batch_size": size, "train.max_length (the prompt budget)": cfg.train.max_length}
    for i in range(0, len(good), size):
        batch = collate([s for _, s in good[i:i + size]])
        with explain_out_of_memory(f"purify block {block.index} (input lines from {block.first_line}), batch rows"
                                   f" {i}-{i + len(batch['sample_ids']) - 1}", knobs, batch):
            answers.extend(generate(batch))
    d = cfg.dataset
    rows = [{**row, d.id_column: sample.id, d.image_column: sample.meta["image_path"], d.response_column: answer,
             "original_response": row[d.response_column]}
            for (row, sample), answer in zip(good, answers)]
    write_text(quarantine_path(out, block.index), "".join(json.dumps(r) + "\n" for r in bad))
    write_text(shard_path(out, block.index), "".join(json.dumps(r) + "\n" for r in rows))
    counts = {"block": block.index, "rows": len(rows), "quarantined": len(bad)}
    write_json(record_path(out, block.index), {
        **counts, "input_rows": block.rows, "input_sha256": block.sha256,
        "shard_sha256": sha256_file(shard_path(out, block.index)),
        "quarantine_sha256": sha256_file(quarantine_path(out, block.index))})
    return counts
