"""Seeds: the run's global RNGs from ``seed``, and one rule for every stream derived from it.

``derive_seed(seed, a, b, ...)`` folds each part in as ``seed * 1_000_003 + part``: a stream per purpose
(and per rank, epoch or block), never the same as another's, and the same whichever process draws it
(a resumed run, another Ray actor). For one part and seed 0 it is the part itself.
"""
from __future__ import annotations

import random

# the parts that name a stream (the others, epoch, rank and block numbers, count within one)
PRETRAIN_FLIPS, PCR_PATCHES, ABL_UNLEARN, PRETRAIN_TEXTURES = 1, 4, 5, 6


def derive_seed(seed: int, *parts: int) -> int:
    for part in parts:
        seed = seed * 1_000_003 + part
    return seed


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
