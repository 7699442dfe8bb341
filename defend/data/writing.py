"""Write samples as a jsonl + image folder that the ``jsonl`` loader reads back."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from defend.data.samples import DataError, Sample

# what a file name cannot hold (a separator, NUL) or should not (control characters, the Windows separator)
UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def id_file_problem(sample_id: str) -> str | None:
    """Why ``<sample_id>.png`` is not a file name of its own inside a folder, or None."""
    if sample_id in ("", ".", ".."):
        return "is empty" if not sample_id else "is a folder's name"
    bad = UNSAFE_NAME.search(sample_id)
    if bad:
        return f"holds {bad.group()!r}"
    if len(f"{sample_id}.png".encode()) > 255:
        return "is longer than a file name can be"
    return None


def check_file_ids(samples: Iterable[Sample], image_dir: str) -> None:
    """Every id is a safe file name and no two are equal: ``image_dir/<id>.png`` stays inside the folder
    and is one sample's image. Cheap; run it before any work."""
    seen: dict[str, str] = {}
    for sample in samples:
        where = sample.source or "a sample"
        problem = id_file_problem(sample.id)
        if problem is None and sample.id in seen:
            problem = f"is also the id of {seen[sample.id]}"
        if problem:
            raise DataError(f"{where}: sample id {sample.id!r} {problem}, and its image is written to"
                            f" {image_dir}/<id>.png; set dataset.id_column to a column of unique ids that are"
                            " file names (no '/', '\\', control characters, not '.' or '..'), or clean the ids.")
        seen[sample.id] = where


def sample_row(sample: Sample, root: Path, image_dir: str) -> dict:
    """A jsonl row; in-memory images are saved as PNG under ``root/image_dir``, paths are kept."""
    if isinstance(sample.image, Image.Image):
        if id_file_problem(sample.id):  # callers check every id up front (check_file_ids); a last guard
            check_file_ids([sample], image_dir)
        rel = Path(image_dir) / f"{sample.id}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sample.image.save(root / rel, format="PNG")
        image = str(rel)
    else:
        image = str(Path(sample.image).resolve()) if sample.image is not None else None
    return {"id": sample.id, "image": image, "prompt": sample.prompt, "response": sample.response, **sample.meta}


def write_jsonl_set(samples, root: Path, name: str, image_dir: str) -> Path:
    """Write ``root/name`` (one JSON row per sample) and the images it needs."""
    path = root / name
    with path.open("w") as handle:
        for sample in samples:
            handle.write(json.dumps(sample_row(sample, root, image_dir)) + "\n")
    return path
