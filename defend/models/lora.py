"""LoRA and QLoRA wrapping with peft. By default only the language model gets adapters."""
from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, prepare_model_for_kbit_training

from defend.config import ConfigError, LoraConfig

LANGUAGE_MODEL = "language_model"
ARCHITECTURE_ALIASES = ("projector", "vision_tower")


def language_model_prefix(model: torch.nn.Module) -> str:
    """Dotted name of the text decoder inside a vision-language model."""
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise ConfigError(f"{type(model).__name__}: cannot find its language model; set lora.target_modules.")


def linear_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    return types


def linear_names(model: torch.nn.Module, prefix: str) -> list[str]:
    """Full names of the linear layers inside the submodule ``prefix`` (the output head excluded)."""
    # the output head is no decoder layer, though some get_decoder()s (BLIP-2's OPTForCausalLM) hold it
    head, linear = model.get_output_embeddings(), linear_types()
    return [f"{prefix}.{n}" for n, m in model.get_submodule(prefix).named_modules()
            if isinstance(m, linear) and m is not head]


def language_model_linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the language model's linear layers (what ``language_model`` targets)."""
    return linear_names(model, language_model_prefix(model))


def expand_target(model: torch.nn.Module, target: str) -> list[str]:
    """``language_model``; ``projector`` / ``vision_tower`` (whatever the architecture calls them:
    LLaVA's multi_modal_projector, BLIP-2's language_projection, Qwen2-VL's merger; vision_model,
    visual); or the name of a container: its linear layers."""
    if target == LANGUAGE_MODEL:
        return language_model_linear_names(model)
    if target in ARCHITECTURE_ALIASES:
        return [linear for name in alias_modules(model, target) for linear in container_linears(model, name)]
    return container_linears(model, target)


def alias_modules(model: torch.nn.Module, alias: str) -> tuple[str, ...]:
    """The module names ``projector`` or ``vision_tower`` stand for in this model's architecture."""
    from defend.models.archs import architecture

    arch = architecture(model.config)
    return arch.projector if alias == "projector" else (arch.vision_tower,)


def without_linear_layers(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The architecture aliases among ``targets`` whose modules hold no linear layer for LoRA (Gemma 3's
    projector is a bare weight matrix): peft trains those modules in full (``modules_to_save``)."""
    linear, full = linear_types(), []
    for target in (t for t in targets if t in ARCHITECTURE_ALIASES):
        for name in alias_modules(model, target):
            found = [m for n, m in model.named_modules() if n == name or n.endswith("." + name)]
            if found and not any(isinstance(x, linear) for m in found for x in m.modules()):
                full.append(name)
    return full


def container_linears(model: torch.nn.Module, target: str) -> list[str]:
    """The linear layers inside the modules named (or ending in) ``target``; else ``target`` itself."""
    linear = linear_types()
    named = [n for n, m in model.named_modules()
             if (n == target or n.endswith("." + target)) and not isinstance(m, linear)]
    if not named:
        return [target]  # a linear layer's name (suffix) or a pattern: peft matches it
    inside = [name for prefix in named for name in linear_names(model, prefix)]
    return inside or [target]  # no linear layer inside (an embedding, a conv): peft decides


def apply_lora(model: torch.nn.Module, lora: LoraConfig, quantized: bool) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (after k-bit preparation when ``quantized``)."""
    targets, full = lora.target_modules, []
    if isinstance(targets, str):
        targets = language_model_linear_names(model) if targets == LANGUAGE_MODEL else targets
    else:  # names of containers (language_model, vision_tower, ...) stand for their linear layers
        full = without_linear_layers(model, targets)
        targets = [name for t in targets for name in expand_target(model, t) if name not in full]
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                            modules_to_save=full or None)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules: {err}") from err
