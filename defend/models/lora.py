"""LoRA and QLoRA wrapping with peft. By default only the language model gets adapters."""
from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, prepare_model_for_kbit_training

from defend.config import ConfigError, LoraConfig

LANGUAGE_MODEL = "language_model"


def language_model_prefix(model: torch.nn.Module) -> str:
    """Dotted name of the text decoder inside a vision-language model."""
    decoder = model.get_decoder()
    for name, module in model.named_modules():
        if module is decoder:
            return name
    raise ConfigError(f"{type(model).__name__}: cannot find its language model; set lora.target_modules.")


def language_model_linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the language model's linear layers (what ``language_model`` targets)."""
    prefix = language_model_prefix(model)
    decoder = model.get_submodule(prefix)
    linear_types = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        pass
    # the output head is no decoder layer, though some get_decoder()s (BLIP-2's OPTForCausalLM) hold it
    head = model.get_output_embeddings()
    return [f"{prefix}.{n}" for n, m in decoder.named_modules() if isinstance(m, linear_types) and m is not head]


def apply_lora(model: torch.nn.Module, lora: LoraConfig, quantized: bool) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters (after k-bit preparation when ``quantized``)."""
    targets = lora.target_modules
    if isinstance(targets, str):
        targets = language_model_linear_names(model) if targets == LANGUAGE_MODEL else targets
    else:  # a list may name the language model alongside other modules (e.g. the projector)
        targets = [name for t in targets for name in (language_model_linear_names(model) if t == LANGUAGE_MODEL else [t])]
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise ConfigError(f"lora.target_modules: {err}") from err
