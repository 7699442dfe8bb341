"""Samples without an image: collated as text-only rows, and the vision side still runs (weight 0)."""
import pytest
import torch

from defend.data import Sample
from defend.data.loaders import load_samples
from defend.models import load_model
from defend.models.vision import find_vision_tower


@pytest.mark.parametrize("family", ["mllm", "mdlm"])
def test_text_only_batches_train_and_still_run_the_vision_tower(make_cfg, family):
    cfg = make_cfg(family, "dataset.max_samples=2")
    vlm = load_model(cfg)
    image_row = load_samples(cfg.dataset)[0]
    text_row = Sample(id="t", image=None, prompt="what is two plus two?", response="four")
    collate = vlm.train_collator()

    mixed = collate([image_row, text_row])
    assert mixed["pixel_values"].shape[0] == 1  # the one image
    image_token = vlm.model.config.image_token_id
    assert (mixed["input_ids"][1] == image_token).sum() == 0 and (mixed["input_ids"][0] == image_token).sum() > 0

    text_only = collate([text_row, text_row])
    assert "pixel_values" not in text_only
    calls = []
    find_vision_tower(vlm.model).register_forward_hook(lambda *a: calls.append(1))
    loss = vlm.loss(text_only)
    assert calls == [1]  # the guard ran the encoder once, on the blank image
    assert vlm.vision_guard(text_only).item() == 0.0 and vlm.vision_guard(mixed) == 0.0
    loss.backward()
    projector = [p for n, p in vlm.model.named_parameters() if "multi_modal_projector" in n]
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in projector)  # reached, weight 0
    for row in (mixed, text_only):
        assert torch.isfinite(vlm.loss(row))
