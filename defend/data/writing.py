"""Write samples as a jsonl + image folder that the ``jsonl`` loader reads back."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from PIL import Image

from defend.data.samples import Sample


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_row(sample: Sample, root: Path, image_dir: str) -> dict:
    """A jsonl row; in-memory images are saved as PNG under ``root/image_dir``, paths are kept."""
    if isinstance(sample.image, Image.Image):
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
