"""Build a real byte-level BPE tokenizer offline (tiny models; no hub).

Byte-level so that any text, including words the corpus never had (attack targets), encodes.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IMAGE_TOKEN = "<image>"
MASK_TOKEN = "<|mdm_mask|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IMAGE_TOKEN, MASK_TOKEN]

def tiny_chat_template(image_marker: str = IMAGE_TOKEN) -> str:
    """One user turn: the image placeholder the processor expands, the prompt, then the answer cue."""
    return ("{% for message in messages %}{% if message['role'] == 'user' %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image_marker +
            "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %} answer:{% endif %}")


TINY_CHAT_TEMPLATE = tiny_chat_template()


def build_bpe_tokenizer(
    corpus: Iterable[str],
    vocab_size: int,
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and wrap it as a transformers tokenizer.

    ``extra_special_tokens`` maps attribute names to the atomic tokens a processor looks up
    (``image_token``, ``vision_start_token``, ...); default ``{"image_token": "<image>"}``.
    ``SPECIAL_TOKENS`` are atomic tokens either way.
    """
    named = {"image_token": IMAGE_TOKEN} if extra_special_tokens is None else extra_special_tokens
    specials = SPECIAL_TOKENS + [t for t in named.values() if t not in SPECIAL_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        mask_token=MASK_TOKEN,
        extra_special_tokens=named,
        chat_template=chat_template,
        padding_side="right",
    )
