"""Every architecture through every defense, in process, on its tiny build (the CLI cells, under
ZeRO-3 and Ray, are in tests/distributed/test_architectures_cli.py).

Per architecture: masking 0% gives exactly the plain answers; a planted vision token is ranked first
by ``saliency``; every selection scores every vision token and masking replaces exactly each image's
share; PCR's perturbed view changes exactly the chosen patches of every image or crop and nothing
else; QLoRA quantizes the language model only and trains; ABL isolates and unlearns.
"""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from defend.config import load_config
from defend.data import load_samples
from defend.models import load_model
from defend.models.archs import TINY_ARCHS
from defend.models.lora import apply_lora, language_model_linear_names
from defend.objectives import TrainingContext
from defend.objectives.pcr import PatchCrossView
from defend.purify.masking import masked_features, masked_generate
from defend.purify.saliency import fisher_saliency, vision_token_scores
from tests.conftest import TINY_TEST_OVERRIDES

ARCHS = list(TINY_ARCHS)
CASES = [pytest.param(a, "mllm", id=a) for a in ARCHS] + [
    pytest.param(a, "mdlm", id=f"{a}-mdlm") for a, cls in TINY_ARCHS.items() if cls.diffusion and a != "llava"]
PATCH = 16  # = tiny.patch_size of TINY_TEST_OVERRIDES: one PCR patch is one vision patch (one Qwen2-VL row)


def config(arch: str, family: str, *overrides: str):
    return load_config(None, [*TINY_TEST_OVERRIDES, f"tiny.arch={arch}", f"model.family={family}",
                              "dataset.split=test", "dataset.max_samples=4", "eval.max_new_tokens=4", *overrides])


_loaded: dict = {}


def loaded(arch: str, family: str):
    """(cfg, vlm in eval mode, samples), built once per case for the module."""
    if (arch, family) not in _loaded:
        cfg = config(arch, family)
        vlm = load_model(cfg)
        vlm.model.eval()
        _loaded[arch, family] = cfg, vlm, load_samples(cfg.dataset)
    return _loaded[arch, family]


@pytest.mark.parametrize("arch,family", CASES)
def test_masking_nothing_gives_exactly_the_plain_answers(arch, family):
    _, vlm, samples = loaded(arch, family)
    batch = vlm.generate_collator()(samples)
    plain = vlm.generate(batch)
    tokens = vlm.vision_tokens(batch)
    assert len(tokens.counts) == len(samples) and sum(tokens.counts) == tokens.features.shape[0]
    assert vlm.generate(batch, features=tokens.features) == plain  # the seam writes back what it read
    assert masked_generate(vlm, batch, 0.0, "saliency", "mean", 1, torch.Generator()) == plain
    noise = torch.randn(tokens.features.shape, generator=torch.Generator().manual_seed(0))
    # the injected tokens reach generate's prefill (its first output-head call), and only its prefill
    assert torch.equal(prefill_logits(vlm, batch, tokens.features), prefill_logits(vlm, batch, None))
    assert not torch.allclose(prefill_logits(vlm, batch, noise), prefill_logits(vlm, batch, None), atol=1e-4)


def prefill_logits(vlm, batch, features) -> torch.Tensor:
    calls = []
    head = vlm.base_model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: calls.append(out.detach()))
    try:
        vlm.generate(batch, features=features)
    finally:
        handle.remove()
    return calls[0]


def first_layer_input(vlm, batch, features, where: tuple[int, int]) -> torch.Tensor:
    """What the language model's first decoder layer receives at ``where`` (row, position)."""
    layer = next(m for n, m in vlm.arch.language_model(vlm.base_model).named_modules() if n.endswith("layers.0"))
    got = {}

    def hook(module, args, kwargs):
        got["h"] = (args[0] if args else kwargs["hidden_states"])[where]
        raise StopIteration

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        vlm.first_step_logits(batch, features)
    except StopIteration:
        pass
    finally:
        handle.remove()
    return got["h"]


@pytest.mark.parametrize("arch,family", CASES)
def test_saliency_ranks_a_planted_vision_token_first(arch, family):  # directional and trace
    """The planted token reaches the first decoder layer as a near-zero vector (its position
    embedding, Gemma's scaling and the like undone), so the pre-norm's Jacobian, ~1/norm, makes the
    output most sensitive to it. Any misalignment of tokens and scores would rank another first."""
    _, vlm, samples = loaded(arch, family)
    batch = vlm.generate_collator()(samples[:2])
    tokens = vlm.vision_tokens(batch)
    i = tokens.counts[0] // 2 + 1
    where = tuple(vlm.image_positions(batch["input_ids"]).nonzero()[i].tolist())
    features = tokens.features.clone()
    features[i] = 0
    offset = first_layer_input(vlm, batch, features, where)
    features[i] = 1
    scale = first_layer_input(vlm, batch, features, where) - offset  # the embedding -> layer map is affine
    direction = torch.randn(features.shape[1], generator=torch.Generator().manual_seed(0))
    features[i] = (1e-3 * direction - offset) / scale
    assert first_layer_input(vlm, batch, features, where).norm() < 1e-2
    planted = tokens.with_features(features)
    for scores in (fisher_saliency(vlm, batch, planted, 1, torch.Generator().manual_seed(0)),  # trace
                   vision_token_scores(vlm, batch, "saliency", 8, torch.Generator().manual_seed(0), planted)):
        first_image = scores[: tokens.counts[0]]
        assert int(first_image.argmax()) == i
        assert first_image.topk(2).values[0] > 10 * first_image.topk(2).values[1]


@pytest.mark.parametrize("selection", ["saliency", "attention", "random"])
@pytest.mark.parametrize("arch,family", CASES)
def test_each_selection_scores_every_vision_token_and_masks_each_images_share(arch, family, selection):
    _, vlm, samples = loaded(arch, family)
    batch = vlm.generate_collator()(samples)
    tokens = vlm.vision_tokens(batch)
    scores = vision_token_scores(vlm, batch, selection, 1, torch.Generator().manual_seed(0), tokens)
    assert scores.shape == (tokens.features.shape[0],) and torch.isfinite(scores).all() and (scores >= 0).all()
    assert scores.sum() > 0
    replaced, chosen = masked_features(vlm, batch, 0.45, selection, "zero", 1, torch.Generator().manual_seed(0))
    assert [int(c.sum()) for c in tokens.split(chosen)] == [round(0.45 * n) for n in tokens.counts]
    assert (replaced[chosen] == 0).all() and torch.equal(replaced[~chosen], tokens.features[~chosen])
    answers = masked_generate(vlm, batch, 0.45, selection, "mean", 1, torch.Generator().manual_seed(0))
    assert len(answers) == len(samples) and all(isinstance(a, str) for a in answers)


def changed_patches(original: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """(N, rows, cols) bool of (N, C, H, W) images: which PATCH x PATCH patches differ."""
    n, c, h, w = original.shape
    diff = (original != perturbed).reshape(n, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return diff.any(5).any(3).any(1)


@pytest.mark.parametrize("arch", ARCHS)
def test_pcr_perturbs_exactly_the_chosen_patches_of_every_image_or_crop(arch):
    cfg, vlm, samples = loaded(arch, "mllm")
    cfg = config(arch, "mllm", "objective.name=pcr", "objective.pcr.mode=noise", "objective.pcr.fraction=0.25",
                 f"objective.pcr.patch_size={PATCH}")
    batch = vlm.train_collator()(samples)
    doubled = PatchCrossView(TrainingContext(cfg, vlm, samples, None)).add_views(batch)
    pixels = batch["pixel_values"]
    original, perturbed = doubled["pixel_values"].chunk(2)
    assert torch.equal(original, pixels) and torch.equal(doubled["input_ids"], batch["input_ids"].repeat(2, 1))
    if "image_grid_thw" in batch:  # Qwen2-VL: one flattened row per vision patch
        rows = [(g[1] * g[2]).item() for g in batch["image_grid_thw"]]
        per_image = [(o != p).any(1).sum().item()
                     for o, p in zip(original.split(rows), perturbed.split(rows))]
        assert per_image == [round(0.25 * r) for r in rows]
    else:  # every image, or every crop of an anyres image
        images = original.flatten(0, -4), perturbed.flatten(0, -4)
        changed = changed_patches(*images).flatten(1)
        assert changed.sum(1).tolist() == [round(0.25 * changed.shape[1])] * changed.shape[0]
    assert vlm.score(doubled, views=2).logits.shape[0] == 2 * len(samples)


@pytest.mark.parametrize("arch", ARCHS)
def test_qlora_quantizes_only_the_language_model_and_trains(arch):
    # bitsandbytes quantizes in blocks of 64 along the input dim: the text model needs >= 64 wide
    cfg = config(arch, "mllm", "quant.load_in_4bit=true", "tiny.text_hidden=64", "dataset.max_samples=2")
    vlm = load_model(cfg)
    modules = dict(vlm.model.named_modules())
    lm = language_model_linear_names(vlm.model)
    assert lm and all(isinstance(modules[n], bnb.nn.Linear4bit) for n in lm)
    vision_side = vlm.arch.vision_modules()
    kept = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)
            and any(part in vision_side for part in n.split("."))]
    assert kept and not any(isinstance(modules[n], bnb.nn.Linear4bit) for n in kept)
    vlm.model = apply_lora(vlm.model, cfg.lora, quantized=True)
    vlm.loss(vlm.train_collator()(load_samples(cfg.dataset))).backward()
    grads = [p.grad for n, p in vlm.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("arch", ARCHS)
def test_abl_isolates_then_unlearns(arch, tmp_path):
    from recipes.finetune import FinetuneRecipe

    cfg = config(arch, "mllm", "objective.name=abl", "dataset.split=train", "dataset.max_samples=8",
                 "train.micro_batch_size=4", "objective.abl.isolation_steps=2", "objective.abl.isolation_ratio=0.25",
                 "objective.abl.unlearn_batch_size=2", "objective.abl.gamma=0.0", "deepspeed=zero0",
                 f"output_dir={tmp_path}")
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    try:
        batches = iter(recipe.loader)
        for _ in range(2):
            recipe.objective(next(batches), recipe.engine)
        _, terms = recipe.objective(next(batches), recipe.engine)
    finally:
        recipe.cleanup()
    abl = recipe.objective.objectives[0]
    assert abl.losses and terms["abl_isolated"] == len(abl.isolated) >= 1
    assert abl.isolated == sorted(abl.losses, key=abl.losses.get)[: len(abl.isolated)]  # the lowest losses
    assert terms["abl_unlearn"] < 0


@pytest.mark.parametrize("arch", ARCHS)
def test_hflip_equals_processing_the_mirrored_image(arch):
    """The adapter's flip of processed pixels (Qwen2-VL: of its flattened patches) is what the processor
    gives for the mirrored image: the base view of anyres models, every image of the others."""
    from PIL import Image

    _, vlm, samples = loaded(arch, "mllm")
    images = [s.load_image() for s in samples[:2]]
    process = vlm.processor.image_processor

    def pixels(imgs):
        return vlm.arch.process_images(process, imgs)

    plain = pixels(images)
    flipped = vlm.arch.hflip(plain, torch.tensor([True, False]))["pixel_values"]
    assert not torch.equal(flipped, plain["pixel_values"])
    expected = pixels([images[0].transpose(Image.FLIP_LEFT_RIGHT), images[1]])["pixel_values"]
    if flipped.dim() == 5:  # anyres: the whole-image view
        mask = pixels(images)
        flipped = vlm.arch.whole_image({**mask, "pixel_values": flipped})
        expected = vlm.arch.whole_image({**mask, "pixel_values": expected})
    assert torch.allclose(flipped, expected, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_pretrain_vision_trains_the_tower_of_every_architecture(arch, tmp_path):
    from recipes.pretrain_vision import recipe_main

    cfg = config(arch, "mllm", "dataset.name=easy_vqa_captions", "dataset.split=train", "dataset.max_samples=8",
                 "train.max_steps=2", "train.micro_batch_size=4", "train.lr=1e-2", "deepspeed=zero0",
                 f"output_dir={tmp_path}")
    summary = recipe_main(cfg)
    from defend.models.vision import find_vision_tower

    before = find_vision_tower(loaded(arch, "mllm")[1].model).state_dict()
    after = find_vision_tower(load_model(config(arch, "mllm", f"model.path={summary['saved']}")).model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_an_architecture_without_adapter_is_refused_by_validate_before_any_weights_load(tmp_path, capsys):
    import json

    from defend.cli import main

    folder = tmp_path / "mllama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mllama"}))  # no weights at all
    assert main(["validate", "finetune_tiny_mllm", f"model.path={folder}"]) == 2
    err = capsys.readouterr().err
    assert "model_type 'mllama' has no architecture adapter" in err and "qwen2_5_vl" in err and "docs/models.md" in err
    cfg = config("llava", "mllm", f"model.path={folder}")
    with pytest.raises(Exception, match="mllama"):
        load_model(cfg)  # the recipes' loader refuses it before from_pretrained
    assert main(["validate", "finetune_tiny_mllm", f"model.path={folder}", "model.family=mdlm"]) == 2
