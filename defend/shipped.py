"""The data folders shipped beside the package: ``ds_configs/`` (DeepSpeed JSONs) and ``slurm/`` (sbatch
templates and the shell library they source).

In a checkout they are top-level folders next to ``defend/``; a wheel installs them next to ``defend/`` in
site-packages (``[tool.setuptools.package-data]`` in pyproject.toml), so one path, relative to this file,
finds them in both. ``tests/test_wheel.py`` checks an installed wheel."""
from __future__ import annotations

from pathlib import Path

from defend.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG_DIR = ROOT / "ds_configs"
SLURM_DIR = ROOT / "slurm"


def require(folder: Path, what: str) -> Path:
    """``folder``, or a ConfigError saying this install of defend lacks it."""
    if not folder.is_dir():
        raise ConfigError(f"{what}: the folder shipped with defend, {folder}, is missing; this install of defend"
                          " lacks its data files. Reinstall it (pip install defend, or pip install -e . in a"
                          " checkout), or pass the path of your own file instead of a shipped name.")
    return folder
