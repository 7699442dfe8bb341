"""LaViDa-Dream from its published format, against the outputs its authors' own code recorded
(tests/fixtures/lavida_dream: a tiny random-init checkpoint in LaViDa-Dream's exact format, the
reference run with its pinned transformers 4.50.3). The folder is converted once (``defend convert
lavida_dream``) and loaded as the ``lavida`` architecture: LLaVA-OneVision with pooled crops over a
bidirectional Qwen2 decoder whose position i-1 scores token i (shifted logits)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from defend.config import ConfigError, load_config
from defend.models.convert_lavida import DREAM_MASK_ID, convert_lavida_dream
from tests.models.float_tolerance import END_TO_END, TEXT_MODEL, relative_gap

FIXTURE = Path(__file__).parents[1] / "fixtures" / "lavida_dream"
LLADA_V = Path(__file__).parents[1] / "fixtures" / "llada_v"
IMAGE_TOKEN = 151700  # an unused row of Dream's vocabulary
PAD = 1000  # an all-zero embedding row: the reference pads spliced rows with zero vectors and attends to them
EOS = 151643
IMAGES = ["square_40x40", "wide_40x80"]  # row 0's and row 1's image (the prompts' too)
SETTINGS = ["s8_g8_maskgit_plus", "s4_g8_topk_margin", "s8_g8_entropy", "s8_g8_topk_margin_prefix",
            "s4_g8_maskgit_plus_prefix"]


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """The tiny checkpoint as LaViDa's code saved it, rebuilt (sha256-checked) into a temp folder."""
    folder = tmp_path_factory.mktemp("lavida") / "lavida-dream"
    shutil.copytree(FIXTURE / "checkpoint", folder, ignore=shutil.ignore_patterns("model.safetensors"))
    done = subprocess.run([sys.executable, str(FIXTURE / "expand_checkpoint.py"), str(folder)], check=True,
                          capture_output=True, text=True)
    assert json.loads(done.stdout)["byte_identical"]
    return folder


@pytest.fixture(scope="module")
def converted(published, tmp_path_factory) -> Path:
    return convert_lavida_dream(published, tmp_path_factory.mktemp("lavida") / "model",
                                vision_config=FIXTURE / "siglip_tiny" / "config.json", image_token_id=IMAGE_TOKEN)


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict, dict]:
    return (load_file(FIXTURE / "inputs.safetensors"), load_file(FIXTURE / "expected.safetensors"),
            json.loads((FIXTURE / "expected.json").read_text()))


def settings_of(folder: Path) -> list[str]:
    """The converted folder's defend_diffusion.json as overrides."""
    saved = json.loads((folder / "defend_diffusion.json").read_text())
    return [f"{k}={json.dumps(v).replace(' ', '')}" for k, v in saved.items() if k.startswith(("diffusion.", "model."))]


@pytest.fixture(scope="module")
def vlm(converted):
    from transformers import AutoModelForImageTextToText

    from defend.models.archs import check_model_folder
    from defend.models.diffusion import MaskedDiffusionVLM

    assert check_model_folder(converted, "mdlm") == "lavida"
    model = AutoModelForImageTextToText.from_pretrained(converted, dtype=torch.float32)  # as defend's loader does
    model.eval()
    return MaskedDiffusionVLM(model, None, load_config(None, settings_of(converted)))


def batch_of(reference, rows: list[list[int]], images: list[str], length: int | None = None) -> dict:
    """Our batch for the reference's rows: -200 expanded to its image's token count, right-padded with the
    zero-embedding id, everything attended (as LaViDa's forward runs), the reference's own pixel tensors."""
    inputs, _, meta = reference
    counts = {name: span["n_image_tokens"] for name, span in zip(IMAGES, meta["spans"])}
    ids = []
    for row, name in zip(rows, images):
        at = row.index(-200)
        ids.append(row[:at] + [IMAGE_TOKEN] * counts[name] + row[at + 1:])
    length = length or max(map(len, ids))
    crops = [inputs[f"pixel_values.{name}"] for name in images]
    most = max(c.shape[0] for c in crops)
    pixels = torch.stack([torch.cat([c, c.new_zeros(most - c.shape[0], *c.shape[1:])]) for c in crops])
    sizes = torch.stack([inputs[f"image_size.{name}"] for name in images]).flip(-1)  # PIL (w, h) -> (h, w)
    return {"input_ids": torch.tensor([r + [PAD] * (length - len(r)) for r in ids]),
            "attention_mask": torch.ones(len(ids), length, dtype=torch.long), "pixel_values": pixels,
            "image_sizes": sizes}


def test_the_converted_folder_is_a_lavida_folder_with_dream_settings(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "lavida" and config["crop_pool_mode"] == "bilinear"
    assert config["text_config"]["model_type"] == "qwen2" and config["text_config"]["is_causal"] is False
    assert config["vision_config"]["num_hidden_layers"] == 2  # the reference drops the tower's last layer
    assert config["vision_aspect_ratio"] == "anyres_max_4"  # LaViDa's anyres: the largest grid, never shrunk
    processor = json.loads((converted / "processor_config.json").read_text())
    assert processor["num_image_tokens"] == 9  # 5x5 patches pooled to 3x3
    settings = json.loads((converted / "defend_diffusion.json").read_text())
    assert settings["diffusion.mask_token_id"] == DREAM_MASK_ID and settings["diffusion.blocked_token_ids"] == []
    assert settings["diffusion.shifted_logits"] is True and settings["diffusion.complementary_mask"] is True
    assert settings["diffusion.inverse_t_weight"] is False
    assert settings["diffusion.sampler"] == "dream" and settings["diffusion.prefix_lm"] is True  # as its eval decodes
    assert settings["diffusion.dream_alg"] == "topk_margin" and settings["diffusion.top_k"] == 50


def test_each_converter_refuses_the_other_kind_naming_it(published, tmp_path):
    from defend.models.convert import convert_llada_v

    with pytest.raises(ConfigError, match="LaViDa-Dream.*defend convert lavida_dream"):
        convert_llada_v(published, tmp_path / "a")
    with pytest.raises(ConfigError, match="LLaDA-V.*defend convert llada_v"):
        convert_lavida_dream(LLADA_V / "checkpoint", tmp_path / "b")
    lavida_llada = tmp_path / "lavida-llada"  # LaViDa's LLaDA variant: llava_llada with LLaDA's own config fields
    lavida_llada.mkdir()
    (lavida_llada / "config.json").write_text(json.dumps(
        {"model_type": "llava_llada", "d_model": 4096, "n_layers": 32, "mm_hidden_size": 1152}))
    for convert in (convert_llada_v, convert_lavida_dream):
        with pytest.raises(ConfigError, match="LaViDa-LLaDA"):
            convert(lavida_llada, tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_vision_tokens_and_logits_equal_the_reference(vlm, reference):
    inputs, expected, meta = reference
    batch = batch_of(reference, inputs["input_ids"].tolist(), IMAGES, length=expected["inputs_embeds"].shape[1])
    tokens = vlm.vision_tokens(batch)
    assert tokens.counts == [25, 30]  # 3x3 base + the pooled grid unpadded (4x3 / 3x6) with its newline tokens
    image = batch["input_ids"] == IMAGE_TOKEN
    # tower, projector, bilinear pooling of every crop, anyres unpadding, newline tokens: to float32 ulps
    assert torch.allclose(tokens.features, expected["inputs_embeds"][image], atol=1e-6)
    active = expected["active_ids"]
    with torch.no_grad():
        logits = vlm.model(**batch).logits
        decoder = vlm.model.model.language_model  # from the reference's own embeddings: the text model alone
        exact = vlm.model.lm_head(decoder(inputs_embeds=expected["inputs_embeds"],
                                          attention_mask=batch["attention_mask"]).last_hidden_state)
    assert relative_gap(exact[..., active], expected["logits_active"]) < TEXT_MODEL
    assert relative_gap(logits[..., active], expected["logits_active"]) < END_TO_END
    inactive = torch.ones(logits.shape[-1], dtype=torch.bool)
    inactive[active] = False
    assert logits[..., inactive].abs().max() == 0  # the zero rows of the compact checkpoint


def test_an_unpadded_grid_equals_the_reference(vlm, reference):
    """A 56x40 image on the 2x1 grid: its pooled 3x6 grid keeps 4 of 6 columns."""
    inputs, expected, meta = reference
    prompt = inputs["gen_prompt_ids.0"][0].tolist()
    at = prompt.index(-200)
    n = meta["extra.extra_40x56.n_image_tokens"]
    ids = torch.tensor([prompt[:at] + [IMAGE_TOKEN] * n + prompt[at + 1:]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": inputs["pixel_values.extra_40x56"][None],
             "image_sizes": inputs["image_size.extra_40x56"].flip(-1)[None]}
    with torch.no_grad():
        logits = vlm.model(**batch).logits
    assert (logits[..., expected["active_ids"]] - expected["extra.extra_40x56.logits_active"]).abs().max() < 1e-4


def test_the_sft_loss_equals_the_reference_for_its_noise_draw(vlm, reference):
    """LaViDa-Dream's loss for the same draw: t ~ U(b) then U(b, L) from the global generator (our
    diffusion_noise's order), the response masked and its complement as a second copy, no 1/t weight,
    every <|endoftext|> pad a target, and Dream's shifted cross entropy averaged over the batch's targets.
    Both rows have 10 targets, so our per-row average is that mean (README: the difference otherwise)."""
    from defend.models.diffusion_loss import diffusion_noise

    inputs, expected, meta = reference
    rows = inputs["input_ids"].tolist()
    batch = batch_of(reference, rows, IMAGES, length=expected["spliced_labels"].shape[1])
    labels = expected["spliced_labels"].clone()
    labels[batch["input_ids"] == EOS] = EOS  # LaViDa's forward: pads are attended and become targets
    batch["labels"] = labels
    batch["image_rows"] = torch.tensor([True, True])
    d = vlm.cfg.diffusion
    torch.manual_seed(meta["loss"]["seed"])
    noise = diffusion_noise(batch["input_ids"], labels != -100, DREAM_MASK_ID, eps=d.eps,
                            inverse_t_weight=d.inverse_t_weight, complementary_mask=d.complementary_mask)
    assert torch.equal(noise.noisy == DREAM_MASK_ID, expected["loss.final_masked_indices"].bool())
    torch.manual_seed(meta["loss"]["seed"])
    with torch.no_grad():
        loss = vlm.score(batch).task_loss()
    assert abs(loss.item() - meta["loss"]["value"]) < 1e-5 * meta["loss"]["value"], (loss.item(), meta["loss"])


@pytest.mark.parametrize("setting", SETTINGS)
def test_dreams_sampler_gives_the_references_tokens_at_every_step(vlm, converted, reference, setting):
    """``diffusion.sampler=dream`` (LaViDa-Dream decodes with Dream's sampler, not LLaDA's block-wise one):
    the tokens committed at every step equal the reference's, for each confidence rule, uncached and with
    LaViDa's ``prefix_lm`` (eval/run_dream.sh: the prompt encoded alone once, its last position's argmax the
    first answer token, the answer attending to that cache)."""
    from defend.models.diffusion import MaskedDiffusionVLM

    inputs, expected, meta = reference
    for row, image in enumerate(IMAGES):
        s = meta["generation"][str(row)][setting]["settings"]
        cfg = load_config(None, [*settings_of(converted), "diffusion.cache=none", f"diffusion.steps={s['steps']}",
                                 f"diffusion.gen_length={s['max_new_tokens']}", f"diffusion.dream_alg={s['alg']}",
                                 f"diffusion.prefix_lm={str(s['prefix_lm']).lower()}",
                                 f"diffusion.top_k={meta['generation_config']['top_k']}"])
        batch = batch_of(reference, [inputs[f"gen_prompt_ids.{row}"][0].tolist()], [image])
        trace: list[torch.Tensor] = []
        tokens = MaskedDiffusionVLM(vlm.model, None, cfg).generate_tokens(batch, trace=trace)
        assert torch.equal(torch.stack(trace, 1), expected[f"gen.{row}.{setting}.history"]), (row, setting)
        assert tokens[0].tolist() == meta["generation"][str(row)][setting]["tokens"], (row, setting)


def test_the_dream_sampler_gives_batched_rows_the_answers_they_get_alone(vlm, converted, reference):
    """Rows of different prompt lengths decoded together (left-padded to one length, padding unattended)
    get the tokens each gets alone, with prefix_lm and uncached."""
    from defend.models.diffusion import MaskedDiffusionVLM

    inputs, _, meta = reference
    prompts = [inputs[f"gen_prompt_ids.{row}"][0].tolist() for row in range(len(IMAGES))]
    alone = [batch_of(reference, [p], [image]) for p, image in zip(prompts, IMAGES)]
    longest = max(b["input_ids"].shape[1] for b in alone)
    rows = []
    for b in alone:  # left-pad each to the longest, as the collator does for generation
        pad = longest - b["input_ids"].shape[1]
        rows.append({**b, "input_ids": torch.cat([torch.full((1, pad), PAD), b["input_ids"]], 1),
                     "attention_mask": torch.cat([torch.zeros(1, pad, dtype=torch.long), b["attention_mask"]], 1)})
    together = {"input_ids": torch.cat([r["input_ids"] for r in rows]),
                "attention_mask": torch.cat([r["attention_mask"] for r in rows]),
                "pixel_values": batch_of(reference, prompts, IMAGES)["pixel_values"],
                "image_sizes": torch.cat([r["image_sizes"] for r in rows])}
    for extra in (["diffusion.prefix_lm=true"], ["diffusion.prefix_lm=false", "diffusion.cache=none"]):
        cfg = load_config(None, [*settings_of(converted), *extra, "diffusion.steps=4", "diffusion.gen_length=8"])
        model = MaskedDiffusionVLM(vlm.model, None, cfg)
        expected = torch.cat([model.generate_tokens(b) for b in alone])
        assert torch.equal(model.generate_tokens(together), expected), extra


def test_defend_convert_lavida_dream_writes_the_folder_and_prints_how_to_run_it(published, converted, tmp_path, capsys):
    from defend.cli import main

    assert main(["convert", "lavida_dream", str(published), str(tmp_path / "m"),
                 "--vision-config", str(FIXTURE / "siglip_tiny" / "config.json"),
                 "--image-token-id", str(IMAGE_TOKEN)]) == 0
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (converted / "model.safetensors").read_bytes()
    assert "diffusion.shifted_logits=true" in capsys.readouterr().out
    assert main(["convert", "lavida_dream", str(tmp_path / "m"), str(tmp_path / "again")]) == 2  # already converted


def test_a_converted_lavida_dream_folder_fine_tunes_and_evaluates_with_masking(published, tmp_path):
    """The published layout end to end through the CLI recipes and defend's loader (a stand-in tokenizer:
    the fixture has none; ids past the tiny vocabulary are Dream's own)."""
    from defend.config import TinyConfig
    from defend.models.tiny_components import tiny_tokenizer
    from recipes.evaluate import recipe_main as evaluate
    from recipes.finetune import recipe_main as finetune

    source = tmp_path / "lavida-dream"
    shutil.copytree(published, source)
    tiny_tokenizer(TinyConfig(), extra_special_tokens={}, chat_template=None).save_pretrained(source)
    target = convert_lavida_dream(source, tmp_path / "converted", vision_config=FIXTURE / "siglip_tiny" / "config.json")
    run = [f"model.path={target}", *settings_of(target), "train.max_length=512",
           "diffusion.gen_length=4", "diffusion.steps=4", "diffusion.block_length=4"]
    trained = finetune(load_config("finetune_tiny_mdlm", [*run, "dataset.max_samples=2", "train.micro_batch_size=2",
                                                           "train.max_steps=1", f"output_dir={tmp_path / 'ft'}"]))
    assert trained["steps"] == 1
    metrics = evaluate(load_config("evaluate_tiny_mdlm", [*run, f"model.adapter={trained['saved']}",
                                                           "dataset.max_samples=2", "eval.max_samples=2",
                                                           "purify.mask_ratio=0.45", f"output_dir={tmp_path / 'ev'}"]))
    assert metrics["n"] == 2
