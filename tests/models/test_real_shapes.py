"""Every architecture at its real published shape (issue 17): LoRA training, DiSP's saliency and
masked generation on one image of the real size, through ``load_model`` like a real checkpoint.

Each model is the published config.json with the language model cut to one layer and the vision
tower to two (``tests/real_shapes.py``: real hidden sizes, real vocabulary and embedding table,
real image processor and patch layout, random weights), built once per architecture into a temp
folder (a module-scoped fixture; one architecture's model is alive at a time) and removed after.

The saliency check (b) reads the scores of the saliency pass inside the masked generation (c)
rather than running a second, identical pass: ``masked_generate`` runs unchanged, a spy on its
``vision_token_scores`` and ``masked_features`` records what they returned. fp32, one thread.
"""
from __future__ import annotations

import gc
import inspect
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from defend.config import Config, load_config
from defend.models import load_model
from defend.models.base import VisionLanguageModel
from defend.models.lora import apply_lora
from defend.purify import masking
from tests.real_shapes import ARCHS, build_real_shape, overrides, real_samples

RATIO = 0.45
NEW_TOKENS = 2


@dataclass
class Case:
    name: str
    path: Path
    cfg: Config
    vlm: VisionLanguageModel
    samples: list[Any]
    disp: dict[str, Any] = field(default_factory=dict)  # what one masked generation saw (filled once)


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Case]:
    name = request.param
    path = build_real_shape(name, tmp_path_factory.mktemp(f"real_{name}"))
    cfg = load_config(None, overrides(path, max_new_tokens=NEW_TOKENS))
    vlm = load_model(cfg)
    vlm.model = apply_lora(vlm.model, cfg.lora, quantized=False)  # as the finetune recipe trains it
    yield Case(name, path, cfg, vlm, real_samples(name, 1))
    shutil.rmtree(path, ignore_errors=True)
    gc.collect()


def test_lora_step(case: Case) -> None:
    """(a) One LoRA step at the real token count: finite loss, gradients on LoRA only, an update."""
    vlm = case.vlm
    batch = vlm.train_collator()(case.samples)
    image_tokens = int(vlm.image_positions(batch["input_ids"]).sum())
    assert image_tokens == ARCHS[case.name].vision_tokens, ARCHS[case.name].layout
    lora = {n: p for n, p in vlm.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora), sorted(n for n in lora if "lora_" not in n)[:5]
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-3)
    loss = vlm.loss(batch)
    assert math.isfinite(loss.item())
    loss.backward()
    grads = {n: p.grad for n, p in lora.items() if "lora_B" in n}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or not g.abs().sum() > 0][:5]
    before = {n: lora[n].detach().clone() for n in list(grads)[:3]}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert all(not torch.equal(lora[n], b) for n, b in before.items())


def run_disp(case: Case, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """One ``masked_generate`` at ratio 0.45 (saliency selection with its default score, mean
    replacement) on the real-size image, recording its saliency scores, the vision tokens it scored,
    what it masked and what it generated."""
    if case.disp:
        return case.disp
    seen: dict[str, Any] = {}
    scores_fn, features_fn = masking.vision_token_scores, masking.masked_features

    def scores_spy(*args, **kwargs):
        called = inspect.signature(scores_fn).bind(*args, **kwargs).arguments
        seen["selection"], seen["tokens"] = called["selection"], called["tokens"]
        seen["scores"] = scores_fn(*args, **kwargs)
        return seen["scores"]

    def features_spy(*args, **kwargs):
        seen["features"], seen["chosen"] = features_fn(*args, **kwargs)
        return seen["features"], seen["chosen"]

    vlm = case.vlm
    generate = vlm.model.generate

    def generate_spy(*args, **kwargs):
        seen["output_ids"] = out = generate(*args, **kwargs)
        seen["prompt_length"] = kwargs["input_ids"].shape[1]
        return out

    monkeypatch.setattr(masking, "vision_token_scores", scores_spy)
    monkeypatch.setattr(masking, "masked_features", features_spy)
    monkeypatch.setattr(vlm.model, "generate", generate_spy)
    batch = vlm.generate_collator()(case.samples)
    generator = torch.Generator().manual_seed(0)
    seen["answers"] = masking.masked_generate(vlm, batch, RATIO, "saliency", "mean", 1, generator)
    case.disp.update(seen)
    return case.disp


def test_saliency_scores_every_vision_token(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """(b) The saliency pass gives one finite score per vision token, as many as the real layout has."""
    disp = run_disp(case, monkeypatch)
    shape = ARCHS[case.name]
    assert disp["selection"] == "saliency"
    assert disp["tokens"].counts == [shape.vision_tokens], shape.layout
    hidden = case.vlm.base_model.config.get_text_config().hidden_size
    assert tuple(disp["tokens"].features.shape) == (shape.vision_tokens, hidden)
    scores = disp["scores"]
    assert scores.shape == (shape.vision_tokens,)
    assert torch.isfinite(scores).all() and (scores >= 0).all() and scores.sum() > 0


def test_masked_generation(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """(c) Masked generation: round(0.45 N) vision tokens replaced by the image mean, then up to
    ``eval.max_new_tokens`` greedy tokens from the real-size vocabulary."""
    disp = run_disp(case, monkeypatch)
    n = ARCHS[case.name].vision_tokens
    chosen = disp["chosen"]
    assert chosen.shape == (n,) and int(chosen.sum()) == round(RATIO * n)
    tokens = disp["tokens"].features
    mean = tokens.mean(0)
    assert torch.allclose(disp["features"][chosen], mean.expand(int(chosen.sum()), -1))
    assert torch.equal(disp["features"][~chosen], tokens[~chosen])
    new = disp["output_ids"][:, disp["prompt_length"]:]
    assert 1 <= new.shape[1] <= NEW_TOKENS
    vocab = case.vlm.model.get_output_embeddings().weight.shape[0]
    assert vocab == case.vlm.base_model.config.get_text_config().vocab_size and (new < vocab).all()
    assert len(disp["answers"]) == 1 and isinstance(disp["answers"][0], str)
