"""A data folder checked against its ``manifest.json`` before a run relies on it.

``poison`` and ``purify`` write their ``data/`` folder whole, with a manifest whose ``files`` maps
every file (path relative to the folder) to its sha256 and ``sizes`` to its byte count. Readers
(``evaluate``, ``finetune``, ``defense_results``) call ``verify_data_folder`` before any model
loads; it refuses, naming the folder, the file and the fix:

- a listed file that is missing, or a file that is not listed (the folder is not what was written);
- a file whose size differs from ``sizes`` (truncated, appended to, replaced);
- a ``.jsonl``/``.json`` file, or one the reader names in ``uses``, whose sha256 differs.

Cost: a ``stat`` per file, and a read of the jsonl files (the rows: prompts, responses, labels,
what metrics rest on). Images are checked by size only: a poisoned train split can hold millions of
them, and hashing all before every evaluation would cost more than the evaluation; a same-size
change to an image is the one edit this does not catch (``uses=`` hashes named files too). A
manifest without ``sizes`` (written before they were recorded) gets the file list and the hashes.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from defend.config import ConfigError
from defend.data.writing import sha256_file

MANIFEST = "manifest.json"
HASHED = (".jsonl", ".json")  # always hashed; every other file is checked by size


def file_sizes(root: Path, names: Iterable[str]) -> dict[str, int]:
    """``{name: bytes}`` of ``root/name``: the ``sizes`` a writer records beside ``files``."""
    return {name: (root / name).stat().st_size for name in names}


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}


def writer_of(manifest: dict) -> str:
    return "poison" if "attack" in manifest else "purify"


def read_manifest(folder: Path, what: str) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{what}: '{folder}' has no {MANIFEST}; point it at a poison or purify run's data/ folder.")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{what}: {path} is not valid JSON ({err}); re-run the recipe that wrote '{folder}'"
                          " (poison or purify) into a fresh output_dir.") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ConfigError(f"{what}: {path} has no 'files' table (name -> sha256); re-run the recipe that wrote"
                          f" '{folder}' (poison or purify) into a fresh output_dir.")
    return manifest


def verify_data_folder(folder: str | Path, what: str, uses: Iterable[str] = ()) -> dict:
    """Check ``folder`` against its manifest (see the module doc); return the manifest.

    ``what`` is the config key that named the folder (it starts every message)."""
    folder = Path(folder)
    manifest = read_manifest(folder, what)
    listed: dict[str, str] = manifest["files"]
    sizes: dict[str, int] = manifest.get("sizes") or {}
    present = folder_files(folder)
    fix = (f"re-run `defend run {writer_of(manifest)}` with the config that wrote it into a fresh output_dir"
           " (or restore the folder from where it was copied)")

    def refuse(problem: str):
        raise ConfigError(f"{what}: the data folder '{folder}' does not match its {MANIFEST}: {problem}. It was"
                          f" changed after it was written; {fix}.")

    missing = [name for name in listed if name not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        refuse(f"'{missing[0]}' is missing{more}")
    extra = [name for name in present if name not in listed]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        refuse(f"'{extra[0]}' is not listed in it{more}")
    for name, size in sizes.items():
        actual = present[name].stat().st_size if name in present else None
        if actual != size:
            refuse(f"'{name}' has {actual} bytes, the manifest records {size}")
    for name in dict.fromkeys([*(n for n in listed if n.endswith(HASHED)), *uses]):
        if name not in listed:
            refuse(f"'{name}' is not listed in it")
        if sha256_file(present[name]) != listed[name]:
            refuse(f"'{name}' has a different sha256 than the manifest records (same size: its content was edited)"
                   if name in sizes else f"'{name}' has a different sha256 than the manifest records")
    return manifest


def verify_dataset_file(path: str | Path | None, what: str = "dataset.path") -> None:
    """A jsonl file inside a folder whose manifest lists it (a poison or purify run's train.jsonl):
    verify that folder, hashing the file; any other file is left to its loader."""
    if not path:
        return
    path = Path(path)
    folder = path.parent
    if not (folder / MANIFEST).is_file():
        return
    manifest = read_manifest(folder, what)
    if path.name in manifest["files"]:
        verify_data_folder(folder, what, uses=[path.name])
