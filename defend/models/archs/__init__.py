"""One adapter per vision-language architecture, looked up by the checkpoint's ``model_type``.

Adding an architecture: a module here with an ``Architecture`` subclass, plus its line below
(docs/models.md shows an example).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from defend.config import ConfigError
from defend.models.archs.base import AnyResArchitecture, Architecture
from defend.models.archs.blip2 import Blip2
from defend.models.archs.gemma3 import Gemma3
from defend.models.archs.idefics3 import Idefics3
from defend.models.archs.lavida import Lavida
from defend.models.archs.llava import Llava
from defend.models.archs.llava_next import LlavaNext
from defend.models.archs.llava_onevision import LlavaOneVision
from defend.models.archs.paligemma import PaliGemma
from defend.models.archs.qwen2_vl import Qwen2_5VL, Qwen2VL

ARCHITECTURES: dict[str, type[Architecture]] = {
    "llava": Llava,
    "llava_next": LlavaNext,
    "llava_onevision": LlavaOneVision,
    "qwen2_vl": Qwen2VL,
    "qwen2_5_vl": Qwen2_5VL,
    "blip-2": Blip2,
    "paligemma": PaliGemma,
    "gemma3": Gemma3,
    "idefics3": Idefics3,
    "lavida": Lavida,
}
TINY_ARCHS = {cls.tiny_arch: cls for cls in ARCHITECTURES.values() if cls.tiny_arch}


def unsupported(model_type: str, where: str) -> ConfigError:
    return ConfigError(
        f"{where}: model_type '{model_type}' has no architecture adapter in defend; supported:"
        f" {', '.join(ARCHITECTURES)}. Adding one is one file in defend/models/archs/ (docs/models.md).")


def architecture(config: Any) -> Architecture:
    """The adapter of a loaded model's config."""
    cls = ARCHITECTURES.get(config.model_type)
    if cls is None:
        raise unsupported(config.model_type, type(config).__name__)
    return cls(config)


def check_model_folder(path: Path, family: str) -> str:
    """Refuse, before any weights load, a folder whose architecture has no adapter (or that cannot be a
    masked-diffusion model); returns its model_type."""
    import json

    config_file = path / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type", "")
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.path: cannot read {config_file} ({err}).") from err
    cls = ARCHITECTURES.get(model_type)
    if cls is None:
        raise unsupported(model_type, f"model.path: {config_file}")
    if family == "mdlm" and not cls.diffusion:
        layouts = ", ".join(t for t, c in ARCHITECTURES.items() if c.diffusion)
        raise ConfigError(f"model.family=mdlm with {config_file} (model_type '{model_type}'): masked diffusion"
                          f" runs on the {layouts} layouts; use model.family=mllm for this one.")
    return model_type


__all__ = ["ARCHITECTURES", "TINY_ARCHS", "AnyResArchitecture", "Architecture", "architecture", "check_model_folder"]
