"""The pieces every tiny random-init model shares: an offline BPE tokenizer over easy-vqa's words and
ViT/decoder sizes from ``TinyConfig``. Each architecture's ``build_tiny`` assembles its model from them."""
from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerFast

from defend.config import TinyConfig
from defend.models.tokenizer import build_bpe_tokenizer

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

    from defend.data.easy_vqa import CAPTION_PROMPT, EASY_VQA_COLORS, EASY_VQA_SHAPES

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
