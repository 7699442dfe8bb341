import json

import pytest
import torch

from defend.config import load_config
from defend.data import DataError, Sample
from defend.data.bag_of_words import bag_of_words, caption_vocabulary
from defend.models import load_model
from defend.models.vision import find_vision_tower
from recipes.finetune import recipe_main as finetune
from recipes.pretrain_vision import recipe_main as pretrain_vision


def caption(text: str) -> Sample:
    return Sample(id=text, image=None, prompt="describe", response=text, source="test")


def test_vocabulary_drops_words_every_caption_has_and_rare_words():
    samples = [caption(t) for t in ("a red circle", "a blue circle", "A red Triangle.", "a teal square")]
    assert caption_vocabulary(samples) == ["blue", "circle", "red", "square", "teal", "triangle"]
    assert caption_vocabulary(samples, min_count=2) == ["circle", "red"]
    targets = bag_of_words(["a red circle", "red red"], ["circle", "red", "teal"])
    assert targets.tolist() == [[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]


def test_vocabulary_of_identical_captions_is_an_error_naming_the_fix():
    with pytest.raises(DataError, match="min_word_count"):
        caption_vocabulary([caption("a photo"), caption("a photo")])


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def outside_the_encoder(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of ``model`` but its vision encoder's (language model, projector, output layer)."""
    tower = find_vision_tower(model)
    prefix = next(name for name, module in model.named_modules() if module is tower) + "."
    return {k: v for k, v in weights(model).items() if not k.startswith(prefix)}


def test_pretrain_vision_learns_caption_words_and_changes_only_the_encoder(make_cfg):
    cfg = make_cfg("mllm", "dataset.name=easy_vqa_captions", "dataset.max_samples=32", "train.max_steps=150",
                   "train.micro_batch_size=16", "train.lr=1e-2", "train.log_every=50")
    before = load_model(cfg).model
    summary = pretrain_vision(cfg)
    log = [json.loads(line) for line in open(f"{cfg.output_dir}/train_log.jsonl")]
    assert [r["step"] for r in log] == [50, 100, 150]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], log
    assert summary["bag_of_words_accuracy"] > 0.3  # exact word sets of 32 seen images; chance is 1/24
    assert "a" not in summary["vocabulary"] and {"circle", "triangle", "rectangle"} <= set(summary["vocabulary"])

    after = load_model(load_config(None, [f"model.path={summary['saved']}", "train.max_length=64"])).model
    old_tower, new_tower = weights(find_vision_tower(before)), weights(find_vision_tower(after))
    assert any(not torch.equal(old_tower[k], new_tower[k]) for k in old_tower)
    old_rest, new_rest = outside_the_encoder(before), outside_the_encoder(after)
    assert old_rest.keys() == new_rest.keys() and any("projector" in k for k in old_rest)
    assert all(torch.equal(old_rest[k], new_rest[k]) for k in old_rest)


def test_pooled_features_average_the_patch_tokens_without_clip_cls(make_cfg):
    from defend.models.archs.base import pooled_vit_features as pooled_image_features

    tower = find_vision_tower(load_model(make_cfg("mllm")).model)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels).last_hidden_state
        pooled = pooled_image_features(tower, pixels)
    assert hidden.shape[1] == 1 + (64 // 16) ** 2  # CLS + 16 patches of the test model
    assert torch.allclose(pooled, hidden[:, 1:].mean(dim=1)) and not torch.allclose(pooled, hidden.mean(dim=1))


def test_finetune_with_a_frozen_vision_tower_trains_everything_else(make_cfg):
    cfg = make_cfg("mdlm", "lora.enabled=false", "train.freeze_vision_tower=true", "dataset.max_samples=8",
                   "train.max_steps=2", "train.micro_batch_size=4", "train.lr=1e-2")
    before = load_model(cfg).model
    saved = finetune(cfg)["saved"]
    after = load_model(load_config(None, [f"model.path={saved}", "model.family=mdlm", "train.max_length=64"])).model
    old_tower, new_tower = weights(find_vision_tower(before)), weights(find_vision_tower(after))
    assert all(torch.equal(old_tower[k], new_tower[k]) for k in old_tower)
    old_lm, new_lm = weights(before.get_decoder()), weights(after.get_decoder())
    assert any(not torch.equal(old_lm[k], new_lm[k]) for k in old_lm)
    old_rest, new_rest = outside_the_encoder(before), outside_the_encoder(after)
    assert any(not torch.equal(old_rest[k], new_rest[k]) for k in old_rest if "projector" in k)


def test_vision_tower_from_copies_only_the_encoder_across_families(make_cfg, tmp_path):
    cfg = make_cfg("mllm", "dataset.name=easy_vqa_captions", "dataset.max_samples=8", "train.max_steps=3",
                   "train.micro_batch_size=4", "train.lr=1e-2")
    saved = pretrain_vision(cfg)["saved"]
    source = load_model(load_config(None, [f"model.path={saved}", "train.max_length=64"])).model
    plain = load_model(make_cfg("mdlm")).model
    grafted = load_model(make_cfg("mdlm", f"model.vision_tower_from={saved}")).model
    want, got = weights(find_vision_tower(source)), weights(find_vision_tower(grafted))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert any(not torch.equal(weights(find_vision_tower(plain))[k], got[k]) for k in got)
    lm_plain, lm_grafted = weights(plain.get_decoder()), weights(grafted.get_decoder())
    assert all(torch.equal(lm_plain[k], lm_grafted[k]) for k in lm_plain)  # the mdlm's own language model


def test_vision_tower_from_a_folder_without_a_model_names_the_key(make_cfg, tmp_path):
    from defend.config import ConfigError

    with pytest.raises(ConfigError, match="model.vision_tower_from"):
        load_model(make_cfg("mllm", f"model.vision_tower_from={tmp_path}"))


def test_the_bag_of_words_head_starts_from_the_seed(make_cfg):
    """The head is built before the run's folder (and its seeding): it must not take whatever the
    process's random state was (it did: standalone runs differed, and the demo's bases depended on
    whether the tiny model had been built in the same process)."""
    from recipes.pretrain_vision import PretrainVisionRecipe

    cfg = make_cfg("mllm", "dataset.name=easy_vqa_captions", "dataset.max_samples=16", "train.max_steps=1")
    heads = []
    for draws in (1, 7):
        torch.rand(draws)  # a different random state before each setup
        recipe = PretrainVisionRecipe(cfg)
        recipe.setup()
        heads.append(recipe.classifier.head.weight.detach().clone())
        recipe.cleanup()
    assert torch.equal(heads[0], heads[1])


def test_textures_blend_a_share_of_the_images_within_their_alpha_the_same_for_the_same_seed():
    from recipes.pretrain_vision import blend_textures

    mean, std = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)
    values = torch.randn(8, 3, 16, 16)
    same = blend_textures(values, mean, std, 0.0, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(same, values)
    blended = blend_textures(values, mean, std, 1.0, 0.3, torch.Generator().manual_seed(0))
    moved = ((blended - values) * std).abs()  # in raw pixel units: (1 - a) x + a t moves a pixel by a |t - x|
    assert (moved.flatten(1).amax(1) > 0).all() and moved.max() <= 0.3 * (values * std + mean).abs().max().clamp(min=1)
    assert torch.equal(blended, blend_textures(values, mean, std, 1.0, 0.3, torch.Generator().manual_seed(0)))


def test_patch_pixels_are_in_the_vit_token_order():
    from recipes.pretrain_vision import patch_pixels

    image = torch.arange(4.0).reshape(1, 1, 2, 2).repeat_interleave(4, 2).repeat_interleave(4, 3).expand(1, 3, 8, 8)
    patches = patch_pixels(image, 4)  # patch k of the 2x2 grid holds the value k, row by row
    assert patches.shape == (1, 4, 48) and [p.unique().item() for p in patches[0]] == [0.0, 1.0, 2.0, 3.0]


def test_pretrain_vision_with_reconstruction_and_textures_learns_to_redraw_its_patches(make_cfg):
    from defend.data import load_samples
    from recipes.pretrain_vision import patch_pixels

    cfg = make_cfg("mllm", "dataset.name=easy_vqa_captions", "dataset.max_samples=32", "train.max_steps=150",
                   "train.micro_batch_size=16", "train.lr=1e-2", "train.log_every=50",
                   "pretrain_vision.reconstruct_weight=1.0", "pretrain_vision.texture_prob=0.5")
    summary = pretrain_vision(cfg)
    vlm = load_model(cfg)
    images = vlm.arch.process_images(vlm.processor.image_processor, [s.load_image() for s in load_samples(cfg.dataset)])
    silent = patch_pixels(images["pixel_values"], vlm.arch.config.vision_config.patch_size).pow(2).mean().item()
    assert summary["reconstruction_mse"] < 0.5 * silent  # far better than drawing every patch as the mean
    assert summary["bag_of_words_accuracy"] > 0.3
