"""LLaDA-V from its published format, against the outputs its authors' own code recorded
(tests/fixtures/llada_v: a tiny random-init checkpoint in LLaDA-V's exact format, the reference run
with its pinned transformers). The folder is converted once (``defend convert llada_v``) and then
loaded as a standard LLaVA-OneVision model with a bidirectional Llama decoder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from defend.config import load_config
from defend.models.convert import LLADA_V_BLOCKED_IDS, convert_llada_v
from defend.models.diffusion import CachedScorer, MaskedDiffusionVLM
from defend.models.diffusion_sampler import diffusion_generate
from tests.models.float_tolerance import END_TO_END, TEXT_MODEL, relative_gap

FIXTURE = Path(__file__).parents[1] / "fixtures" / "llada_v"
IMAGE_TOKEN = 126400  # an unused row of the tiny checkpoint's vocabulary
PAD = 1000  # an all-zero embedding row: the reference pads spliced rows with zero vectors and attends to them
IMAGES = ["square_32x32", "wide_32x64"]  # row 0's and row 1's image (the prompts' too)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """The tiny checkpoint as LLaDA-V's code saved it, rebuilt (sha256-checked) from the compact file
    into a temp folder."""
    import shutil

    folder = tmp_path_factory.mktemp("llada_v") / "LLaDA-V"
    shutil.copytree(FIXTURE / "checkpoint", folder, ignore=shutil.ignore_patterns("model.safetensors"))
    subprocess.run([sys.executable, str(FIXTURE / "expand_checkpoint.py"), str(folder)], check=True,
                   capture_output=True)
    return folder


@pytest.fixture(scope="module")
def converted(published, tmp_path_factory) -> Path:
    return convert_llada_v(published, tmp_path_factory.mktemp("llada_v") / "model",
                           vision_config=FIXTURE / "siglip_tiny" / "config.json", image_token_id=IMAGE_TOKEN)


@pytest.fixture(scope="module")
def reference() -> tuple[dict, dict, dict]:
    return (load_file(FIXTURE / "inputs.safetensors"), load_file(FIXTURE / "expected.safetensors"),
            json.loads((FIXTURE / "expected.json").read_text()))


@pytest.fixture(scope="module")
def vlm(converted):
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(converted, dtype=torch.float32)
    model.eval()
    cfg = load_config(None, ["model.family=mdlm", "diffusion.mask_token_id=126336"])
    return MaskedDiffusionVLM(model, None, cfg)


def spliced(ids: list[int], n_image: int) -> list[int]:
    at = ids.index(-200)
    return ids[:at] + [IMAGE_TOKEN] * n_image + ids[at + 1:]


IMAGE_TOKENS = {"square_32x32": 36, "wide_32x64": 52}  # what the reference spliced for each


def batch_of(reference, rows: list[list[int]], images: list[str], length: int | None = None) -> dict:
    """Our batch for the reference's rows: the -200 placeholder expanded to its image's token count,
    right-padded with the zero-embedding id, everything attended (as the reference runs SFT), the
    reference's own pixel tensors."""
    inputs = reference[0]
    ids = [spliced(row, IMAGE_TOKENS[name]) for row, name in zip(rows, images)]
    length = length or max(map(len, ids))
    crops = [inputs[f"pixel_values.{name}"] for name in images]
    most = max(c.shape[0] for c in crops)
    pixels = torch.stack([torch.cat([c, c.new_zeros(most - c.shape[0], *c.shape[1:])]) for c in crops])
    sizes = torch.stack([inputs[f"image_size.{name}"] for name in images]).flip(-1)  # PIL (w, h) -> (h, w)
    return {"input_ids": torch.tensor([r + [PAD] * (length - len(r)) for r in ids]),
            "attention_mask": torch.ones(len(ids), length, dtype=torch.long), "pixel_values": pixels,
            "image_sizes": sizes}


def test_the_converted_folder_is_a_standard_onevision_model_with_llada_v_settings(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llava_onevision" and config["text_config"]["is_causal"] is False
    assert config["vision_config"]["num_hidden_layers"] == 2  # the reference drops the tower's last layer
    assert config["vision_aspect_ratio"] == "anyres_max_4"
    settings = json.loads((converted / "defend_diffusion.json").read_text())
    assert settings["diffusion.mask_token_id"] == 126336 and settings["diffusion.blocked_token_ids"] == LLADA_V_BLOCKED_IDS


def test_the_converted_image_processor_gives_the_reference_pixels(converted, reference):
    """LLaDA-V's process_images (anyres_max_4: the base view, then the crops of the best pinpoint) on the
    raw images, against the converted folder's processor: the same crops, bit for bit (a 1x1, a 2x1 and
    a 3x3 grid)."""
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(converted)
    inputs = reference[0]
    for name in ("square_32x32", "wide_32x64", "extra_32x48", "extra_72x96"):
        got = processor(images=[Image.fromarray(inputs[f"raw_image.{name}"].numpy(), "RGB")], return_tensors="pt")
        assert torch.equal(got["pixel_values"][0], inputs[f"pixel_values.{name}"]), name
        assert got["image_sizes"][0].tolist() == inputs[f"image_size.{name}"].flip(0).tolist()  # (h, w) vs PIL (w, h)


def test_merged_embeddings_and_logits_equal_the_reference(vlm, reference):
    inputs, expected, meta = reference
    rows = inputs["input_ids"].tolist()  # the collated rows: EOS-padded to the batch's longest, as LLaDA-V pads
    batch = batch_of(reference, rows, IMAGES, length=expected["inputs_embeds"].shape[1])
    tokens = vlm.vision_tokens(batch)
    image = batch["input_ids"] == IMAGE_TOKEN
    assert tokens.counts == [36, 52]
    # the vision tower, projector, anyres unpadding and newline tokens: to 1-2 float32 ulps
    assert torch.allclose(tokens.features, expected["inputs_embeds"][image], atol=1e-6)
    active = expected["active_ids"]
    with torch.no_grad():
        logits = vlm.model(**batch).logits
        decoder = vlm.model.model.language_model  # from the reference's own embeddings: the text model exactly
        exact = vlm.model.lm_head(decoder(inputs_embeds=expected["inputs_embeds"],
                                          attention_mask=batch["attention_mask"]).last_hidden_state)
    assert relative_gap(exact[..., active], expected["logits_active"]) < TEXT_MODEL
    # end to end, those ulps of the image tokens grow through the tiny model's large weights (init 0.2,
    # lm_head x3): 1.2e-4 on logits of up to ~60 on the recording machine
    assert relative_gap(logits[..., active], expected["logits_active"]) < END_TO_END
    inactive = torch.ones(logits.shape[-1], dtype=torch.bool)
    inactive[active] = False
    assert logits[..., inactive].abs().max() == 0  # the zero rows of the compact checkpoint


@pytest.mark.parametrize("setting", ["s8_g8_b8_t0", "s8_g8_b4_t0", "s4_g8_b8_t0"])
def test_sampler_tokens_equal_generate_with_embeds(vlm, reference, setting):
    inputs, expected, meta = reference
    for row, image in enumerate(IMAGES):
        batch = batch_of(reference, [inputs[f"gen_prompt_ids.{row}"][0].tolist()], [image])
        s = meta["generation"][str(row)][setting]["settings"]
        features = vlm.image_features(batch)
        tokens = diffusion_generate(CachedScorer(vlm, batch, features, "none"), batch["input_ids"],
                                    batch["attention_mask"], 126336, s["gen_length"], s["steps"], s["block_length"],
                                    blocked_token_ids=LLADA_V_BLOCKED_IDS)
        assert tokens[0].tolist() == expected[f"gen.{row}.{setting}"][0].tolist(), (row, setting)


def test_the_sft_loss_equals_the_reference_for_its_noise_draw(vlm, reference):
    """LLaDA-V draws t ~ U(b) then U(b, L) from the global generator, as our diffusion_noise does: the
    same seed gives the same masked tokens, and the loss (sum CE/p over masked tokens / response
    tokens / rows, EOS padding included in the response) is the reference's."""
    from defend.models.diffusion_loss import diffusion_noise

    inputs, expected, meta = reference
    batch = batch_of(reference, inputs["input_ids"].tolist(), IMAGES, length=expected["spliced_labels"].shape[1])
    batch["labels"] = expected["spliced_labels"]
    batch["image_rows"] = torch.tensor([True, True])
    torch.manual_seed(meta["loss"]["seed"])
    noise = diffusion_noise(batch["input_ids"], batch["labels"] != -100, 126336)
    assert torch.equal(noise.noisy == 126336, expected["loss.masked_indices"].bool())
    torch.manual_seed(meta["loss"]["seed"])
    with torch.no_grad():
        loss = vlm.score(batch).task_loss()
    assert abs(loss.item() - meta["loss"]["value"]) < 1e-4 * meta["loss"]["value"], (loss.item(), meta["loss"]["value"])


def test_defend_convert_writes_the_folder_and_prints_how_to_run_it(published, converted, tmp_path):
    from defend.cli import main

    assert main(["convert", "llada_v", str(published), str(tmp_path / "m"),
                 "--vision-config", str(FIXTURE / "siglip_tiny" / "config.json"),
                 "--image-token-id", str(IMAGE_TOKEN)]) == 0
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (converted / "model.safetensors").read_bytes()
    assert main(["convert", "llada_v", str(tmp_path / "m"), str(tmp_path / "again")]) == 2  # not a LLaDA-V folder


LLADA_TOKENS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|start_header_id|>": 126346,
                "<|end_header_id|>": 126347, "<|eot_id|>": 126348}


def stand_in_tokenizer():
    """The tiny BPE tokenizer plus LLaDA's chat-template tokens as special tokens (the fixture mirrors
    no tokenizer; LLaDA's own has these tokens, at the ids in LLADA_TOKENS)."""
    from defend.config import TinyConfig
    from defend.models.tiny_components import tiny_tokenizer

    tokenizer = tiny_tokenizer(TinyConfig(), extra_special_tokens={}, chat_template=None)
    tokenizer.add_special_tokens({"additional_special_tokens": list(LLADA_TOKENS)})
    return tokenizer


def test_the_llada_v_label_rule_reproduces_the_reference_rows(reference):
    """preprocess_llada's labels (the fixture's rows): on each recorded generation prompt the rule labels
    exactly the reference's positions, and the answer after it is labelled whole, ending with <|eot_id|>."""
    from defend.data.label_rules import LladaVLabels

    tokenizer = stand_in_tokenizer()
    rule = LladaVLabels(tokenizer)
    ours = {llada: tokenizer.convert_tokens_to_ids(token) for token, llada in LLADA_TOKENS.items()}
    for row in reference[2]["rows"]:
        ids = torch.tensor([ours.get(t, t) for t in row["input_ids"]])
        expected = torch.tensor([ours.get(t, t) for t in row["labels"]])
        prompt = len(row["gen_prompt"])
        labels = rule.prompt_labels(torch.where(ids[:prompt] == -200, 0, ids[:prompt]))
        assert torch.equal(labels, expected[:prompt])
        assert torch.equal(expected[prompt:], ids[prompt:]) and int(ids[-1]) == rule.end


@pytest.fixture(scope="module")
def runnable(published, tmp_path_factory) -> Path:
    """The published layout with a stand-in tokenizer, converted as a user converts it: a folder that
    ``model.path=`` alone runs."""
    import shutil

    source = tmp_path_factory.mktemp("llada_v_user") / "LLaDA-V"
    shutil.copytree(published, source)
    stand_in_tokenizer().save_pretrained(source)
    # a SigLIP processor config beside the weights (as a hub folder may hold) must not replace the anyres one
    (source / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    return convert_llada_v(source, source.parent / "converted", vision_config=FIXTURE / "siglip_tiny" / "config.json")


RUN = ["train.max_length=512", "diffusion.gen_length=6", "diffusion.steps=6", "diffusion.block_length=6"]


def test_a_converted_folder_runs_on_its_own_settings_and_labels_rows_as_llada_v(runnable):
    """model.path alone: the folder's defend_diffusion.json gives family, mask id, blocked tokens and label
    rule (an explicit key still wins); the training rows are labelled as LLaDA-V labels them."""
    from PIL import Image

    from defend.data.samples import Sample
    from defend.models.loading import load_pretrained

    run = [f"model.path={runnable}", *RUN]
    processor = json.loads((runnable / "preprocessor_config.json").read_text())["image_processor_type"]
    assert processor.startswith("LlavaOnevisionImageProcessor")
    cfg = load_config("finetune_tiny_mdlm", run)
    d = cfg.diffusion
    assert (cfg.model.family, d.mask_token_id, d.blocked_token_ids, d.labels) == (
        "mdlm", 126336, LLADA_V_BLOCKED_IDS, "llada_v")
    assert load_config("finetune_tiny_mdlm", [*run, "diffusion.labels=answer"]).diffusion.labels == "answer"

    vlm = MaskedDiffusionVLM(*load_pretrained(cfg), cfg)
    image = Image.new("RGB", (40, 30), "red")
    batch = vlm.train_collator()([Sample(id="a", image=image, prompt="what color", response="red"),
                                  Sample(id="b", image=image, prompt="what color is it here", response="red")])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    tokenizer = vlm.tokenizer
    labelled = tokenizer.convert_ids_to_tokens(ids[labels != -100].tolist())
    answer = tokenizer("red", add_special_tokens=False)["input_ids"]
    header = ["<|start_header_id|>", *tokenizer.tokenize("assistant"), "<|end_header_id|>", *tokenizer.tokenize("\n\n")]
    pads = int((ids == tokenizer.convert_tokens_to_ids("<|endoftext|>")).sum())  # row 0 is the shorter one
    assert labelled == (["<|startoftext|>"] + ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] * 2 + header
                        + tokenizer.convert_ids_to_tokens(answer) + ["<|eot_id|>"] + ["<|endoftext|>"] * pads)
    assert pads > 6 - len(answer) - 1 and batch["attention_mask"].all()  # batch padding is labelled and attended
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert vlm.decode(torch.tensor([[*answer, eot, answer[0]]])) == ["red"]  # an answer ends at <|eot_id|>


def test_a_full_fine_tune_of_a_converted_folder_keeps_its_settings(runnable, tmp_path):
    """Without LoRA the run saves a whole model folder; it carries the base's defend_diffusion.json, so
    model.path=<run>/model runs as masked diffusion with LLaDA-V's settings, as the base did."""
    from recipes.finetune import recipe_main as finetune

    trained = finetune(load_config("finetune_tiny_mdlm", [f"model.path={runnable}", *RUN, "lora.enabled=false",
                                                           "dataset.max_samples=2", "train.micro_batch_size=2",
                                                           "train.max_steps=1", f"output_dir={tmp_path}"]))
    saved = load_config("evaluate_tiny_mdlm", [f"model.path={trained['saved']}"])
    assert (saved.model.family, saved.diffusion.mask_token_id, saved.diffusion.labels) == ("mdlm", 126336, "llada_v")


def test_qlora_quantizes_a_converted_folder_and_trains_lora(runnable):
    import bitsandbytes as bnb

    from defend.data import load_samples
    from defend.models import load_model
    from defend.models.lora import apply_lora, language_model_linear_names

    cfg = load_config("finetune_tiny_mdlm", [f"model.path={runnable}", *RUN, "quant.load_in_4bit=true",
                                             "dataset.max_samples=2"])
    vlm = load_model(cfg)
    modules = dict(vlm.model.named_modules())
    assert all(isinstance(modules[n], bnb.nn.Linear4bit) for n in language_model_linear_names(vlm.model))
    vlm.model = apply_lora(vlm.model, cfg.lora, quantized=True)
    vlm.loss(vlm.train_collator()(load_samples(cfg.dataset))).backward()
    grads = [p.grad for n, p in vlm.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_zero3_on_two_ranks_masked_evaluate_and_the_disp_chain_run_from_the_cli(runnable, tmp_path):
    """As a DiSP user runs LLaDA-V: fine-tune a victim under ZeRO-3 on 2 ranks, evaluate it with DiSP's
    masking, then `defend run disp` (purify on Ray, recovery fine-tune, evaluate) with nothing but
    model.path naming the model."""
    from tests.distributed.runs import defend, write_rows

    model = [f"model.path={runnable}", *RUN]
    defend("run", "finetune", "--config", "finetune_tiny_mdlm", *model, "launcher=torchrun", "nproc=2",
           "deepspeed=zero3", "train.max_steps=2", "dataset.max_samples=8", "train.micro_batch_size=2",
           "train.log_every=1", f"output_dir={tmp_path / 'victim'}")
    steps = [json.loads(line)["step"] for line in (tmp_path / "victim" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    adapter = f"model.adapter={tmp_path / 'victim' / 'adapter'}"
    defend("run", "evaluate", "--config", "evaluate_tiny_mdlm", *model, adapter, "purify.mask_ratio=0.45",
           "dataset.max_samples=4", "eval.max_samples=4", f"output_dir={tmp_path / 'evaluate'}")
    assert json.loads((tmp_path / "evaluate" / "metrics.json").read_text())["n"] == 4

    rows = tmp_path / "rows.jsonl"
    ids = write_rows(rows, 6)
    later = json.dumps(["train.max_steps=2", "train.micro_batch_size=2", *RUN]).replace(" ", "")
    defend("run", "disp", "--config", "disp_demo", *model, adapter, f"dataset.path={rows}", "purify.actors=1",
           "purify.block_size=3", "purify.batch_size=3", "eval.max_new_tokens=6", f"disp.finetune_overrides={later}",
           f"disp.evaluate_overrides={json.dumps([*RUN, 'eval.max_samples=4']).replace(' ', '')}",
           f"output_dir={tmp_path / 'disp'}", timeout=600)
    purified = [json.loads(line) for line in (tmp_path / "disp" / "purify" / "data" / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in purified] == ids and all(isinstance(r["response"], str) for r in purified)
    summary = json.loads((tmp_path / "disp" / "disp.json").read_text())
    assert summary["finetune"]["steps"] == 2 and summary["evaluate"]["n"] == 4
