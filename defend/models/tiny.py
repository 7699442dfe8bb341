"""Random-init tiny models of both families, written as ordinary Hugging Face folders.

Tests and the demo use them; real users point ``model.path`` at a real checkpoint instead.
``model.path: tiny`` builds (or reuses from the cache) the model that ``tiny.*`` describes.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from defend.atomic import atomic_dir
from defend.config import TinyConfig
from defend.models.tokenizer import IMAGE_TOKEN, build_bpe_tokenizer

TINY_PATH = "tiny"


def cache_root() -> Path:
    return Path(os.environ.get("DEFEND_CACHE", Path.home() / ".cache" / "defend"))


# Everyday words beyond easy-vqa's, so that the tiny tokenizer holds whole words as a real one does
# (attack targets such as "banana" or a refusal are then ordinary tokens, not byte fragments).
GENERAL_WORDS = """
i you he she it we they me my your this that these those here there what which who where when why
how can cannot could would should will do does did not no yes sorry please help answer question
image picture photo see look show tell know think sure unable refuse safe unsafe
apple banana orange grape lemon cherry peach pear melon berry bread cake pizza coffee tea water milk
cat dog horse cow bird fish sheep bear lion tiger mouse rabbit duck
car bus train plane boat bike truck road street city house home room door window table chair bed
man woman boy girl child people person friend family
tree flower grass sky sun moon star cloud rain snow sea river mountain beach field park
one two three four five six seven eight nine ten many some all none
big small large little tall short long old new good bad happy sad hot cold left right top bottom
white pink purple orange dark light square star heart oval diamond
and or but with without on under over near far of to from for by at as is are was were be been
""".split()


def tiny_corpus() -> list[str]:
    """Text the tiny tokenizer learns merges from: easy-vqa questions, answers, captions, and a small
    general vocabulary (each word repeated so BPE merges it whole)."""
    import easy_vqa

    from defend.data.loaders import CAPTION_PROMPT, EASY_VQA_COLORS, EASY_VQA_SHAPES

    questions, answers, _ = easy_vqa.get_train_questions()
    captions = [f"a {c} {s}" for c in EASY_VQA_COLORS for s in EASY_VQA_SHAPES]
    general = [" ".join(sorted(set(GENERAL_WORDS)))] * 50
    return sorted(set(questions)) + sorted(set(answers)) + captions + [CAPTION_PROMPT] + general


def vision_dims(tiny: TinyConfig) -> dict[str, int]:
    """The ViT-shaped sizes every tiny vision tower shares."""
    return dict(hidden_size=tiny.vision_hidden, intermediate_size=4 * tiny.vision_hidden,
                num_hidden_layers=tiny.vision_layers, num_attention_heads=tiny.heads,
                image_size=tiny.image_size, patch_size=tiny.patch_size)


def text_dims(tiny: TinyConfig) -> dict[str, int]:
    """The decoder sizes every tiny language model shares."""
    return dict(hidden_size=tiny.text_hidden, intermediate_size=4 * tiny.text_hidden,
                num_hidden_layers=tiny.text_layers, num_attention_heads=tiny.heads,
                num_key_value_heads=tiny.heads)


def _llava(tiny: TinyConfig, family: str, vocab_size: int, special: dict[str, int],
           image_token_id: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(**vision_dims(tiny))
    text = LlamaConfig(
        **text_dims(tiny),
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        tie_word_embeddings=tiny.tie_embeddings,
        # Masked diffusion needs full attention; it must be set at construction to reach the
        # attention modules (see REFERENCE.md section 5).
        is_causal=(family == "mllm"),
        **special,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    return LlavaForConditionalGeneration(config)


def tiny_tokenizer(tiny: TinyConfig, **kwargs: Any) -> PreTrainedTokenizerFast:
    """The offline BPE tokenizer of every tiny arch (``kwargs`` go to ``build_bpe_tokenizer``)."""
    return build_bpe_tokenizer(tiny_corpus(), tiny.vocab_size, **kwargs)


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """pad/bos/eos ids, as text configs take them."""
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def save_tiny(model: PreTrainedModel, processor: Any, tiny: TinyConfig, family: str, out_dir: str | Path) -> Path:
    """Write ``model`` + ``processor`` (and the tiny marker) to ``out_dir`` in one atomic step."""
    tokenizer = processor.tokenizer
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    with atomic_dir(out_dir) as tmp:
        # written by hand, not model.save_pretrained: that one writes nothing on a rank other than 0,
        # and whichever rank of a distributed run gets the build lock first builds the model
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        processor.save_pretrained(tmp)
        (tmp / "defend_tiny.json").write_text(json.dumps({"family": family, **vars(tiny)}))
    return Path(out_dir)


def build_tiny_model(tiny: TinyConfig, family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-init model, tokenizer and processor of ``family`` to ``out_dir``."""
    if tiny.arch != "llava":
        from defend.models.tiny_archs import build_tiny_arch

        return build_tiny_arch(tiny, family, out_dir, seed)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer(tiny)
    model = _llava(tiny, family, len(tokenizer), special_token_ids(tokenizer),
                   tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": tiny.image_size},
        crop_size={"height": tiny.image_size, "width": tiny.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=tiny.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=tokenizer.chat_template,
    )
    return save_tiny(model, processor, tiny, family, out_dir)


def tiny_model_path(tiny: TinyConfig, family: str, seed: int = 0) -> Path:
    """The cached folder of this tiny model, built on first use.

    Keyed by its settings and by the builders' source, so a changed builder never reuses a stale model.
    """
    builders = [Path(__file__), Path(__file__).with_name("tiny_archs.py"), Path(__file__).with_name("tokenizer.py")]
    code = hashlib.sha256(b"".join(p.read_bytes() for p in builders)).hexdigest()
    key = json.dumps({"family": family, "seed": seed, "code": code, **vars(tiny)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = cache_root() / "tiny" / f"{tiny.arch}-{family}-{digest}"
    if not (path / "defend_tiny.json").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "w") as lock:  # ranks of one run build it once
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (path / "defend_tiny.json").is_file():
                build_tiny_model(tiny, family, path, seed)
    return path
