from defend.config import TinyConfig
from defend.models.tiny_components import GENERAL_WORDS, tiny_tokenizer


def test_tiny_tokenizer_holds_easy_vqa_and_general_words_whole():
    tok = tiny_tokenizer(TinyConfig())
    for word in ("circle", "teal", "yes", "banana", "sorry", "cannot", *GENERAL_WORDS):
        assert tok.tokenize(" " + word) == ["Ġ" + word], word
    # byte-level: a word it never saw still encodes, and round-trips
    ids = tok("zyzzyva!", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and tok.decode(ids).strip() == "zyzzyva!"
