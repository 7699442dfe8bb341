"""Samples without an image: text-only rows; an image-free training batch gets a label-free
blank-image row, so every rank's forward runs the vision side (ZeRO-3) without changing the loss."""
import pytest
import torch

from defend.data import Sample
from defend.data.collate import IGNORE_INDEX
from defend.data.loaders import load_samples
from defend.models import load_model
from defend.models.vision import find_vision_tower


@pytest.mark.parametrize("family", ["mllm", "mdlm"])
def test_text_only_rows_and_the_image_padding_row(make_cfg, family):
    cfg = make_cfg(family, "dataset.max_samples=2")
    vlm = load_model(cfg)
    image_row = load_samples(cfg.dataset)[0]
    text_row = Sample(id="t", image=None, prompt="what is two plus two?", response="four")
    collate = vlm.train_collator()
    image_token = vlm.model.config.image_token_id

    mixed = collate([image_row, text_row])
    assert mixed["input_ids"].shape[0] == 2 and mixed["pixel_values"].shape[0] == 1  # the one image, no padding
    assert (mixed["input_ids"][1] == image_token).sum() == 0 and (mixed["input_ids"][0] == image_token).sum() > 0

    text_only = collate([text_row, text_row])
    assert text_only["sample_ids"] == ["t", "t"] and text_only["input_ids"].shape[0] == 3
    assert text_only["pixel_values"].shape[0] == 1 and (text_only["input_ids"][2] == image_token).sum() > 0
    assert (text_only["labels"][2] == IGNORE_INDEX).all() and (text_only["labels"][:2] != IGNORE_INDEX).any()
    calls = []
    find_vision_tower(vlm.model).register_forward_hook(lambda *a: calls.append(1))
    loss = vlm.loss(text_only)
    assert calls == [1] and torch.isfinite(loss)  # the model's own forward ran the encoder
    loss.backward()
    projector = [p for n, p in vlm.model.named_parameters() if "multi_modal_projector" in n]
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in projector)  # reached, no effect
    if family == "mllm":  # deterministic loss: the padding row changes nothing
        unpadded = {k: v[:2] if torch.is_tensor(v) else v for k, v in text_only.items() if k != "pixel_values"}
        with torch.no_grad():
            assert vlm.loss(unpadded).item() == pytest.approx(loss.item(), rel=1e-6)
