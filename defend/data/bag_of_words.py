"""Bag-of-words targets from captions: which words a caption contains, as a multi-hot vector.

Predicting them from the image alone is a cheap, label-free way to pre-train a vision encoder
(Joulin et al., 2016, "Learning Visual Features from Large Weakly Supervised Data").
"""
from __future__ import annotations

import re
from collections import Counter

import torch

from defend.data.samples import DataError, Sample

WORD = re.compile(r"[a-z0-9]+")


def caption_words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def caption_vocabulary(samples: list[Sample], min_count: int = 1) -> list[str]:
    """Words that occur in at least ``min_count`` captions but not in all of them (those tell nothing)."""
    counts = Counter(word for s in samples for word in caption_words(s.response))
    vocab = sorted(w for w, n in counts.items() if min_count <= n < len(samples))
    if not vocab:
        where = samples[0].source if samples else "the dataset"
        raise DataError(
            f"{where}: no caption word to predict (every word occurs in all {len(samples)} captions or"
            f" fewer than {min_count} times); pretrain_vision needs captions that differ, or a lower"
            " pretrain_vision.min_word_count."
        )
    return vocab


def bag_of_words(texts: list[str], vocab: list[str]) -> torch.Tensor:
    """Multi-hot float targets, one row per text."""
    index = {w: i for i, w in enumerate(vocab)}
    targets = torch.zeros(len(texts), len(vocab))
    for row, text in enumerate(texts):
        for word in caption_words(text):
            if word in index:
                targets[row, index[word]] = 1.0
    return targets
