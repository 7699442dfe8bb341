"""Random-init tiny models of both families, written as ordinary Hugging Face folders.

Tests and the demo use them; real users point ``model.path`` at a real checkpoint instead.
``model.path: tiny`` builds (or reuses from the cache) the model that ``tiny.*`` describes.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from transformers import PreTrainedModel

from defend.atomic import atomic_dir
from defend.config import ConfigError, TinyConfig

TINY_PATH = "tiny"


def cache_root() -> Path:
    return Path(os.environ.get("DEFEND_CACHE", Path.home() / ".cache" / "defend"))


def save_tiny(model: PreTrainedModel, processor: Any, tiny: TinyConfig, family: str, out_dir: str | Path) -> Path:
    """Write ``model`` + ``processor`` (and the tiny marker) to ``out_dir`` in one atomic step."""
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic_dir(out_dir) as tmp:
        # written by hand, not model.save_pretrained: that one writes nothing on a rank other than 0,
        # and whichever rank of a distributed run gets the build lock first builds the model
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        processor.save_pretrained(tmp)
        (tmp / "defend_tiny.json").write_text(json.dumps({"family": family, **vars(tiny)}))
    return Path(out_dir)


def build_tiny_model(tiny: TinyConfig, family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-init model, tokenizer and processor of ``tiny.arch`` and ``family`` to ``out_dir``."""
    from defend.models.archs import TINY_ARCHS

    if tiny.arch not in TINY_ARCHS:
        raise ConfigError(f"tiny.arch: no tiny builder for '{tiny.arch}'; choose one of {', '.join(TINY_ARCHS)}.")
    arch = TINY_ARCHS[tiny.arch]()
    if family == "mdlm" and not arch.diffusion:
        layouts = ", ".join(name for name, cls in TINY_ARCHS.items() if cls.diffusion)
        raise ConfigError(f"tiny.arch={tiny.arch} with model.family=mdlm: masked diffusion runs on the {layouts}"
                          " layouts; pick one of them (or model.family=mllm).")
    torch.manual_seed(seed)
    model, processor = arch.build_tiny(tiny, family)
    return save_tiny(model, processor, tiny, family, out_dir)


def tiny_model_path(tiny: TinyConfig, family: str, seed: int = 0) -> Path:
    """The cached folder of this tiny model, built on first use.

    Keyed by its settings and by the builders' source, so a changed builder never reuses a stale model.
    """
    here = Path(__file__).parent
    builders = [Path(__file__), here / "tiny_components.py", here / "tokenizer.py", *sorted((here / "archs").glob("*.py"))]
    code = hashlib.sha256(b"".join(p.read_bytes() for p in builders)).hexdigest()
    key = json.dumps({"family": family, "seed": seed, "code": code, **vars(tiny)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_root() / "tiny" / f"{tiny.arch}-{family}-{digest}"
    if not (path / "defend_tiny.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as lock:  # ranks of one run build it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "defend_tiny.json").is_file():
                build_tiny_model(tiny, family, path, seed)
    return path
