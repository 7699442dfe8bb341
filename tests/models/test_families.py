"""Every tiny arch loads through the generic path, trains LoRA on its language model only, generates.

One test per (arch, family): build with ``tiny_model_path``, load with ``load_model``, collate real
easy-vqa samples with the unchanged ``Collator``, check the loss, the LoRA gradients and generation.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import pytest
import torch

from defend.config import ConfigError, TinyConfig, load_config
from defend.data import load_samples
from defend.models import load_model
from defend.models.archs import ARCHITECTURES, TINY_ARCHS
from defend.models.lora import apply_lora, language_model_prefix
from defend.models.tiny import tiny_model_path
from tests.models.diffusion_oracle import masked_diffusion_loss

SMALL = {"text_hidden": 32, "vision_hidden": 32, "text_layers": 1, "vision_layers": 1, "heads": 4}
VISION_SIDE = sorted({n for cls in ARCHITECTURES.values() for n in cls().vision_modules()})
CASES = [pytest.param(arch, "mllm", id=arch) for arch in TINY_ARCHS] + [
    pytest.param(arch, "mdlm", id=f"{arch}-mdlm") for arch, cls in TINY_ARCHS.items() if cls.diffusion]


@pytest.fixture(scope="module", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Tiny models go to a temp cache, never to ~/.cache."""
    root = tmp_path_factory.mktemp("defend_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEFEND_CACHE", str(root))
        yield root


@pytest.mark.parametrize("arch,family", CASES)
def test_family_trains_and_generates(arch: str, family: str, tiny_cache: Path) -> None:
    torch.manual_seed(0)
    path = tiny_model_path(TinyConfig(arch=arch, **SMALL), family)
    assert path.is_relative_to(tiny_cache) and (path / "defend_tiny.json").is_file()
    cfg = load_config(None, [
        "model.path=tiny", f"model.family={family}", f"tiny.arch={arch}", "dataset.max_samples=3",
        *(f"tiny.{k}={v}" for k, v in SMALL.items()),
    ])
    vlm = load_model(cfg)
    samples = load_samples(cfg.dataset)
    batch = vlm.train_collator()(samples)
    assert batch["input_ids"].shape[0] == len(samples) == 3

    prefix = language_model_prefix(vlm.model)
    vlm.model = apply_lora(vlm.model, cfg.lora, quantized=False)
    loss = vlm.loss(batch)
    assert math.isfinite(loss.item())
    loss.backward()

    lora = {n: p for n, p in vlm.model.named_parameters() if "lora_" in n}
    assert lora, "no LoRA parameters"
    for name, param in lora.items():
        assert f".{prefix}." in name, f"LoRA outside the language model: {name}"
        assert not any(v in name.split(".") for v in VISION_SIDE), f"LoRA on the vision side: {name}"
        # lora_B starts at zero, so only its gradient is non-zero after one backward
        if "lora_B" in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient on {name}"

    answers = vlm.generate(vlm.generate_collator()(samples))
    assert len(answers) == len(samples) and all(isinstance(a, str) for a in answers)


@pytest.mark.parametrize("arch", [arch for arch, cls in TINY_ARCHS.items() if not cls.diffusion])
def test_masked_diffusion_needs_llava_layout(arch: str) -> None:
    with pytest.raises(ConfigError, match="llava"):
        tiny_model_path(TinyConfig(arch=arch, **SMALL), "mdlm")


@pytest.mark.parametrize("arch,family", CASES)
def test_scores_cover_only_the_response_and_give_the_full_logits_loss(arch: str, family: str) -> None:
    """``score`` runs the LM head from the batch's first response token on (BLIP-2: slices); the task
    loss equals the one computed from every position's logits."""
    cfg = load_config(None, [
        "model.path=tiny", f"model.family={family}", f"tiny.arch={arch}", "dataset.max_samples=4",
        *(f"tiny.{k}={v}" for k, v in SMALL.items()),
    ])
    vlm = load_model(cfg)
    batch = vlm.train_collator()(load_samples(cfg.dataset))
    inputs = vlm.model_inputs(batch)
    torch.manual_seed(1)
    scores = vlm.score(batch)
    assert scores.logits.shape[1] < batch["input_ids"].shape[1] - 1  # the prompt is not scored
    assert scores.scored.any()

    torch.manual_seed(1)  # the same diffusion noise
    if family == "mllm":
        logits = vlm.model(**inputs).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100)
    else:
        positions = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        expected = masked_diffusion_loss(
            lambda noisy: vlm.model(**{**inputs, "input_ids": noisy, "position_ids": positions}).logits,
            batch["input_ids"], batch["labels"] != -100, vlm.mask_token_id)
    assert torch.allclose(scores.task_loss(), expected, rtol=1e-5), (scores.task_loss(), expected)
