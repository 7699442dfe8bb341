"""Dataset loaders. Each returns a list of :class:`Sample`, validated row by row.

- ``easy_vqa``: the real offline VQA set shipped by PyPI ``easy-vqa`` (64x64 shapes; ``easy_vqa.py``).
- ``easy_vqa_captions``: one caption per easy-vqa image ("a red circle"), derived from its QA pairs.
- ``easy_vqa_scenes``: a several-word caption per image, read from its pixels too (``scene_captions.py``).
- ``jsonl``: one JSON object per line with ``id``, ``image``, ``prompt``, ``response``.
- ``hf``: a Hugging Face ``datasets`` folder (``save_to_disk``) or a parquet file.
"""
from __future__ import annotations

import json
from pathlib import Path

from defend.config import DatasetConfig
from defend.data.easy_vqa import load_easy_vqa, load_easy_vqa_captions
from defend.data.samples import DataError, Sample
from defend.data.scene_captions import load_easy_vqa_scenes

def check_image_header(path: Path, where: str) -> None:
    """Fail at load time on files that are not images (reads the header only, so it is cheap)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: '{path}' is not a readable image ({err}); replace the file or drop the row.") from err


def row_sample(row: dict, n: int, source: str, cfg: DatasetConfig, image_root: Path | None) -> Sample:
    where = f"{source} row {n}"
    for column in (cfg.prompt_column, cfg.response_column):
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise DataError(
                f"{where}: column '{column}' is missing or empty; every row needs a non-empty"
                f" '{cfg.prompt_column}' and '{cfg.response_column}'."
            )
    image = row.get(cfg.image_column)
    if isinstance(image, str):
        image_path = Path(image)
        if not image_path.is_absolute() and image_root is not None:
            image_path = image_root / image_path
        if not image_path.is_file():
            raise DataError(
                f"{where}: image file '{image_path}' does not exist; fix the path"
                " (relative paths resolve against dataset.image_root) or drop the row."
            )
        check_image_header(image_path, where)
        image = image_path
    elif isinstance(image, dict) and ("bytes" in image or "path" in image):  # datasets Image()
        import io

        from PIL import Image

        image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Path(image["path"])
    sample_id = str(row.get(cfg.id_column, n))
    return Sample(
        id=sample_id,
        image=image,
        prompt=row[cfg.prompt_column],
        response=row[cfg.response_column],
        source=where,
        meta={k: v for k, v in row.items() if isinstance(v, (str, int, float, bool)) and k not in (
            cfg.image_column, cfg.prompt_column, cfg.response_column, cfg.id_column)},
    )


def split_path(cfg: DatasetConfig, split: str) -> Path:
    """``dataset.test_path`` for the test split when given, else ``dataset.path``."""
    key, value = ("dataset.test_path", cfg.test_path) if split == "test" and cfg.test_path else ("dataset.path", cfg.path)
    if not value:
        raise DataError(f"{key}: dataset.name={cfg.name} needs a path.")
    return Path(value)


def load_jsonl(cfg: DatasetConfig, split: str) -> list[Sample]:
    path = split_path(cfg, split)
    if not path.is_file():
        raise DataError(f"dataset: jsonl file '{path}' does not exist.")
    image_root = Path(cfg.image_root) if cfg.image_root else path.parent
    samples = []
    with path.open() as handle:
        for n, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {n}: not valid JSON ({err}).") from err
            samples.append(row_sample(row, n, str(path), cfg, image_root))
    return samples


def load_hf(cfg: DatasetConfig, split: str) -> list[Sample]:
    import datasets

    path = split_path(cfg, split)
    if not path.exists():
        raise DataError(f"dataset.path: '{path}' does not exist (a datasets folder or a parquet file).")
    if path.is_file():
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    else:
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"dataset.split: '{path}' has splits {list(ds)}, not '{split}'.")
            ds = ds[split]
    if cfg.image_column in ds.features and isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    image_root = Path(cfg.image_root) if cfg.image_root else (path.parent if path.is_file() else path)
    return [row_sample(row, n, str(path), cfg, image_root) for n, row in enumerate(ds)]


def load_samples(cfg: DatasetConfig, split: str | None = None) -> list[Sample]:
    """Load and validate the dataset a config names; ``split`` overrides ``cfg.split``."""
    split = split or cfg.split
    if cfg.name == "easy_vqa":
        samples = load_easy_vqa(split)
    elif cfg.name == "easy_vqa_captions":
        samples = load_easy_vqa_captions(split)
    elif cfg.name == "easy_vqa_scenes":
        samples = load_easy_vqa_scenes(split)
    elif cfg.name == "jsonl":
        samples = load_jsonl(cfg, split)
    else:
        samples = load_hf(cfg, split)
    if cfg.max_samples is not None:
        samples = samples[: cfg.max_samples]
    if not samples:
        raise DataError(f"dataset '{cfg.name}' ({cfg.path or split}) has no rows.")
    return samples
