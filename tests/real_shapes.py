"""Tiny checkpoints in the real published shapes (issue 17), built at test time, never committed.

For each architecture: the published ``config.json`` (``tests/fixtures/real_configs/<name>/``) with
the language model cut to ONE layer and the vision tower to ``VISION_LAYERS`` layers, random weights,
and everything else as published: hidden/intermediate sizes, heads, the published ``vocab_size``
(the full embedding table and output head), image size, patch size, anyres pinpoints, Qwen's
min/max pixels, merge and temporal patch sizes, BLIP-2's 32 queries (and its full 12-layer
Q-Former), PaliGemma's 256 image tokens. The processor is built from the published
``preprocessor_config.json`` settings (where none was found, the image processor class defaults that
the published config implies; see ``PREPROCESSOR_SOURCE``).

The only other departures are the token ids: the tokenizer is the offline tiny BPE
(``tiny_tokenizer``, ~700 tokens, ids well inside every real vocabulary) with each architecture's
special tokens and chat template as its ``build_tiny`` assembles them, and the config's token ids
(image token, pad/bos/eos, Qwen's vision start/end/video ids) are set to that tokenizer's ids.
``DEPARTURES`` lists every changed key; the built folder records them in ``defend_real_shapes.json``.

    from tests.real_shapes import ARCHS, build_real_shape, real_samples
    path = build_real_shape("llava_1_5", tmp_dir)   # -> folder for model.path=
"""
from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real_configs"
TEXT_LAYERS = 1
VISION_LAYERS = 2  # llava's vision_feature_layer -2 then reads a real layer's output (the first)


@dataclass(frozen=True)
class Shape:
    """One architecture's published source, the image the checks use, and its vision-token layout."""

    name: str  # test id and fixture folder
    hub_id: str
    config_file: str
    image_size: tuple[int, int]  # (width, height) of the test image, at the published resolution
    vision_tokens: int  # vision tokens per image that the published layout implies for that image
    layout: str  # how that count follows from the published settings


ARCHS: dict[str, Shape] = {s.name: s for s in [
    Shape("llava_1_5", "llava-hf/llava-1.5-7b-hf", "config.json", (336, 336), (336 // 14) ** 2,
          "(336/14)^2 = 576 patches (CLS dropped, 'default' strategy)"),
    # a square 336 image: best pinpoint 336x672 (2 crops) + the base view; unpadded back to 24x24
    Shape("llava_next", "llava-hf/llava-v1.6-mistral-7b-hf", "config.json", (336, 336),
          24 * 24 + 24 * 24 + 24,
          "base 24x24 + crops 24x48 unpadded to 24x24 + 24 newlines = 1176 (pinpoint 336x672, 3 crops)"),
    # a square 384 image: pinpoint 384x384 (1 crop) + the base view, no anyres_max_9 pooling (1x1 grid)
    Shape("llava_onevision", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "config.reconstructed.json",
          (384, 384), 27 * 27 + 27 * 27 + 27,
          "base 27x27 + crop 27x27 + 27 newlines = 1485 (pinpoint 384x384, 2 crops, 'full' strategy)"),
    Shape("qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct", "config.json", (448, 448), (448 // 14) * (448 // 14) // 4,
          "(448/14)*(448/14)/4 = 256 merged patches"),
    Shape("qwen2_5_vl", "Qwen/Qwen2.5-VL-3B-Instruct", "config.json", (448, 448), (448 // 14) * (448 // 14) // 4,
          "(448/14)*(448/14)/4 = 256 merged patches"),
    Shape("blip2", "Salesforce/blip2-opt-2.7b", "config.json", (224, 224), 32, "32 Q-Former queries"),
    Shape("paligemma", "google/paligemma-3b-pt-224", "config.json", (224, 224), (224 // 14) ** 2,
          "(224/14)^2 = 256 patches"),
]}

PREPROCESSOR_SOURCE = {
    "llava_1_5": "published preprocessor_config.json",
    "llava_next": "published preprocessor_config.json",
    "llava_onevision": "not found: LlavaOnevisionImageProcessor defaults (384x384, mean/std 0.5, bicubic)"
                       " + the config's 36 pinpoints, num_image_tokens 729 = (384//14)^2",
    "qwen2_vl": "published preprocessor_config.json",
    "qwen2_5_vl": "published preprocessor_config.json",
    "blip2": "published preprocessor_config.json",
    "paligemma": "not found: SiglipImageProcessor defaults (224x224, mean/std 0.5, bicubic),"
                 " image_seq_length 256 from the config's num_image_tokens",
}


def published(name: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The published config.json (and preprocessor_config.json, None where not found) of ``name``."""
    folder = FIXTURES / name
    config = json.loads((folder / ARCHS[name].config_file).read_text())
    pre = folder / "preprocessor_config.json"
    return config, (json.loads(pre.read_text()) if pre.is_file() else None)


def image_settings(pre: dict[str, Any]) -> dict[str, Any]:
    """Image-processor kwargs from a preprocessor_config.json (its class names dropped)."""
    return {k: v for k, v in pre.items() if k not in ("image_processor_type", "processor_class")}


def _tokenizer(**kwargs: Any) -> Any:
    from defend.config import TinyConfig
    from defend.models.tiny_components import tiny_tokenizer

    return tiny_tokenizer(TinyConfig(), **kwargs)


def _set(config: dict[str, Any], changes: dict[str, Any], where: str, log: dict[str, Any]) -> None:
    """``config[key] = value`` for each change, recording ``where.key: [published, new]`` in ``log`` where
    they differ (None: the key was absent, i.e. the class default)."""
    for key, value in changes.items():
        if config.get(key) != value:
            log[f"{where}{key}"] = [config.get(key), value]
        config[key] = value


def _cut_depth(config: dict[str, Any], log: dict[str, Any], text: str | None, vision: str) -> None:
    """Language model to TEXT_LAYERS (``text``: key under text_config, or None: Qwen's flat text keys),
    the vision tower to VISION_LAYERS (``vision``: its depth key under vision_config)."""
    if text is None:
        _set(config, {"num_hidden_layers": TEXT_LAYERS}, "", log)
    else:
        _set(config["text_config"], {text: TEXT_LAYERS}, "text_config.", log)
    _set(config["vision_config"], {vision: VISION_LAYERS}, "vision_config.", log)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    from defend.models.tiny_components import special_token_ids

    return special_token_ids(tokenizer)


# ---- one builder per architecture: (edited config dict, processor, departures) ----------------------

def _llava_layout(config: dict, log: dict, pad_token_id: bool = False) -> Any:
    """The LLaVA family's edits (1.5, NeXT, OneVision): depth cut, ``image_token_index`` (and the top-level
    ``pad_token_id``) and the text config's special ids set to the tiny tokenizer's; that tokenizer."""
    from defend.models.tokenizer import IMAGE_TOKEN

    tokenizer = _tokenizer()
    _cut_depth(config, log, "num_hidden_layers", "num_hidden_layers")
    ids = {"image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}
    _set(config, {**ids, **({"pad_token_id": tokenizer.pad_token_id} if pad_token_id else {})}, "", log)
    _set(config["text_config"], _special_ids(tokenizer), "text_config.", log)
    return tokenizer


def _llava(name: str, config: dict, pre: dict | None, log: dict) -> Any:
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    tokenizer = _llava_layout(config, log, pad_token_id=True)
    vision = config["vision_config"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**image_settings(pre)), tokenizer=tokenizer,
        patch_size=vision["patch_size"], vision_feature_select_strategy=config["vision_feature_select_strategy"],
        num_additional_image_tokens=1, chat_template=tokenizer.chat_template)
    return processor


def _llava_next(name: str, config: dict, pre: dict | None, log: dict) -> Any:
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    tokenizer = _llava_layout(config, log)
    settings = image_settings(pre)
    settings.pop("aspect_ratio_setting", None)  # a processor-class key ("anyres"), not an image-processor kwarg
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(**settings), tokenizer=tokenizer,
        patch_size=config["vision_config"]["patch_size"],
        vision_feature_select_strategy=config["vision_feature_select_strategy"], num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template)
    return processor


def _llava_onevision(name: str, config: dict, pre: dict | None, log: dict) -> Any:
    from transformers import LlavaOnevisionImageProcessorPil

    tokenizer = _llava_layout(config, log)
    vision = config["vision_config"]
    size = vision["image_size"]
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": size, "width": size}, image_grid_pinpoints=config["image_grid_pinpoints"])
    settings = {"num_image_tokens": (size // vision["patch_size"]) ** 2,
                "vision_feature_select_strategy": config["vision_feature_select_strategy"],
                "vision_aspect_ratio": config["vision_aspect_ratio"]}
    return onevision_processor(image_processor, tokenizer, settings)


def onevision_processor(image_processor: Any, tokenizer: Any, settings: dict[str, Any]) -> Any:
    """LlavaOnevisionProcessor, or its image-only form where torchvision (its video processor's need) is absent."""
    from transformers import LlavaOnevisionProcessor
    from transformers.utils import is_torchvision_available

    from defend.models.image_only_processor import LlavaOnevisionImageOnlyProcessor

    if is_torchvision_available():
        from transformers import LlavaOnevisionVideoProcessor

        return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       video_processor=LlavaOnevisionVideoProcessor(),
                                       chat_template=tokenizer.chat_template, **settings)
    return LlavaOnevisionImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=tokenizer.chat_template, **settings)


def _qwen(name: str, config: dict, pre: dict | None, log: dict) -> Any:
    from transformers import Qwen2VLImageProcessorPil
    from transformers.utils import is_torchvision_available

    from defend.models.archs.qwen2_vl import CHAT_TEMPLATE, TOKENS, Qwen2VL
    from defend.models.image_only_processor import Qwen2VLImageOnlyProcessor

    tokenizer = _tokenizer(extra_special_tokens=TOKENS, chat_template=CHAT_TEMPLATE)
    _cut_depth(config, log, None, "depth")  # the published Qwen configs keep the text keys at the top level
    if name == "qwen2_5_vl":
        # window attention in 7 of 8 published blocks, full at 7/15/23/31: at depth 2, block 0 windowed, 1 full
        _set(config["vision_config"], {"fullatt_block_indexes": [VISION_LAYERS - 1]}, "vision_config.", log)
    _set(config, {**Qwen2VL.token_ids(tokenizer), **_special_ids(tokenizer)}, "", log)
    sizes = {"size": {"shortest_edge": pre["min_pixels"], "longest_edge": pre["max_pixels"]},
             "patch_size": pre["patch_size"], "temporal_patch_size": pre["temporal_patch_size"],
             "merge_size": pre["merge_size"]}
    image_processor = Qwen2VLImageProcessorPil(**sizes, image_mean=pre["image_mean"], image_std=pre["image_std"])
    if is_torchvision_available():
        from transformers import (
            Qwen2_5_VLProcessor,
            Qwen2VLProcessor,
            Qwen2VLVideoProcessor,
        )

        cls = Qwen2_5_VLProcessor if name == "qwen2_5_vl" else Qwen2VLProcessor
        return cls(image_processor, tokenizer, Qwen2VLVideoProcessor(**sizes), chat_template=CHAT_TEMPLATE)
    return Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


def _blip2(name: str, config: dict, pre: dict | None, log: dict) -> Any:
    from transformers import Blip2Processor, BlipImageProcessorPil

    from defend.models.tokenizer import IMAGE_TOKEN

    tokenizer = _tokenizer(extra_special_tokens={}, chat_template=None)  # as Blip2.build_tiny
    # published vision_config/qformer_config only hold a few keys: the rest are the class defaults
    # (EVA ViT-g 1408 x 39 at 224/14, Q-Former 768 x 12); the ViT is cut, the Q-Former is kept whole
    _set(config["text_config"], {"num_hidden_layers": TEXT_LAYERS, **_special_ids(tokenizer)}, "text_config.", log)
    _set(config["vision_config"], {"num_hidden_layers": VISION_LAYERS}, "vision_config.", log)
    _set(config, {"image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "", log)
    processor = Blip2Processor(BlipImageProcessorPil(**image_settings(pre)), tokenizer,
                               num_query_tokens=config["num_query_tokens"])
    return processor


def _paligemma(name: str, config: dict, pre: dict | None, log: dict) -> Any:
    from transformers import PaliGemmaProcessor, SiglipImageProcessorPil

    tokenizer = _tokenizer(chat_template=None)  # as PaliGemma.build_tiny
    image_processor = SiglipImageProcessorPil()  # 224x224, mean/std 0.5, bicubic: SigLIP-224's own
    image_processor.image_seq_length = config["text_config"]["num_image_tokens"]
    processor = PaliGemmaProcessor(image_processor, tokenizer)  # adds the <loc....>/<seg...> tokens
    _cut_depth(config, log, "num_hidden_layers", "num_hidden_layers")
    ids = _special_ids(tokenizer)
    _set(config, {"image_token_index": tokenizer.image_token_id, **ids}, "", log)
    _set(config["text_config"], ids, "text_config.", log)
    return processor


BUILDERS: dict[str, Callable[[str, dict, dict | None, dict], Any]] = {
    "llava_1_5": _llava, "llava_next": _llava_next, "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen, "qwen2_5_vl": _qwen, "blip2": _blip2, "paligemma": _paligemma,
}


def edited_config(name: str) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """The published config with the depth cuts and token ids applied, its processor, and the log of
    every changed key (``key: [published, used]``)."""
    config, pre = published(name)
    config = copy.deepcopy(config)
    log: dict[str, Any] = {}
    processor = BUILDERS[name](name, config, pre, log)
    return config, processor, log


def random_init(config: Any, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``AutoModelForImageTextToText.from_config``'s model with each weight drawn once: from_config runs
    torch's default init and then the model's own ``_init_weights`` over every parameter, and inits a
    tied output head apart from its embedding; on 150k-257k vocabularies that is most of a build."""
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    with no_init_weights():  # torch's init and init_weights skipped: the parameters are bare torch.empty
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    for key in getattr(model, "all_tied_weights_keys", {}):  # overwritten by tie_weights anyway
        model.get_parameter(key)._is_hf_initialized = True
    model.init_weights()  # the model's own _init_weights on every module, then the ties
    return model


def build_real_shape(name: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write the random-init real-shape model ``name`` (config, safetensors, processor) to ``out_dir``."""
    from safetensors.torch import save_model
    from transformers import AutoConfig

    config_dict, processor, log = edited_config(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # parsed the way a hub folder is (legacy keys included)
        (Path(tmp) / "config.json").write_text(json.dumps(config_dict))
        config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(seed)
    model = random_init(config)
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    record = {"name": name, "hub_id": ARCHS[name].hub_id, "source": f"tests/fixtures/real_configs/{name}/"
              f"{ARCHS[name].config_file}", "preprocessor": PREPROCESSOR_SOURCE[name], "departures": log,
              "parameters": params, "vocab_size": model.get_input_embeddings().weight.shape[0],
              "tokenizer_size": len(tokenizer)}
    (out / "defend_real_shapes.json").write_text(json.dumps(record, indent=2))
    del model
    return out


def real_samples(name: str, n: int = 1) -> list[Any]:
    """``n`` easy-vqa questions with their images resized to ``name``'s test image size."""
    from defend.config import DatasetConfig
    from defend.data import load_samples
    from defend.data.samples import Sample

    size = ARCHS[name].image_size
    rows = load_samples(DatasetConfig(name="easy_vqa", split="train", max_samples=n))
    return [Sample(id=s.id, image=s.load_image().resize(size), prompt=s.prompt, response=s.response)
            for s in rows]


def overrides(path: str | Path, max_new_tokens: int = 2) -> list[str]:
    """``load_config`` overrides for a built folder: fp32, long enough rows for the real token counts."""
    return [f"model.path={path}", "model.family=mllm", "model.dtype=float32", "train.max_length=4096",
            f"eval.max_new_tokens={max_new_tokens}"]


# ---- LLaDA-V (issue 18): its own format, through the converter's config mapping, built in memory ----

LLADA_V_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llada_v_real_shape(text_layers: int = 2, vision_layers: int = VISION_LAYERS, seed: int = 0,
                       sizes: dict[str, Any] | None = None, vision_sizes: dict[str, Any] | None = None,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, Any, dict]:
    """A random-init LLaDA-V in its published sizes (``real_configs/llada_v/config.reconstructed.json``:
    4096 hidden, 12288 intermediate, 32 heads, vocab 126464; SigLIP so400m-384; anyres_max_4 over 36
    pinpoints) as ``defend convert llada_v`` maps it, the language model cut to ``text_layers`` and the
    tower to ``vision_layers`` (``sizes`` / ``vision_sizes``: other keys changed too, as a shrunk smoke
    copy needs), built on ``device`` in ``dtype``: the converted model, its processor (the tiny BPE plus
    LLaDA's template tokens and ``<image>``, LLaDA-V's chat template) and the departures. In memory:
    the real-size embedding and head alone are 4 GB in fp32."""
    from defend.models.convert import CHAT_TEMPLATE, SO400M, image_processor, onevision_config, processor_settings

    source = json.loads((FIXTURES / "llada_v" / "config.reconstructed.json").read_text())
    log: dict[str, Any] = {}
    _set(source, {"num_hidden_layers": text_layers, **(sizes or {})}, "", log)
    tokenizer = _tokenizer(extra_special_tokens={}, chat_template=CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": [*LLADA_V_TOKENS, "<image>"]})
    vision = {**SO400M, **(vision_sizes or {}), "num_hidden_layers": vision_layers + 1}  # the converter drops one
    log.update({f"vision_config.{k}": [SO400M[k], v] for k, v in (vision_sizes or {}).items() if SO400M.get(k) != v})
    log["vision_config.num_hidden_layers"] = [SO400M["num_hidden_layers"] - 1, vision_layers]
    config = onevision_config(source, vision, tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    with torch.device(device):
        model = random_init(config, dtype)
    settings = {k: v for k, v in processor_settings(config).items() if k != "image_token"}
    return model, onevision_processor(image_processor(config), tokenizer, settings), log
