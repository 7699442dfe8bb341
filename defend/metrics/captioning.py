"""Captioning scores from pycocoevalcap (BLEU-4, CIDEr) on lightly tokenized text.

pycocoevalcap's PTB tokenizer needs Java; lowercasing and splitting off punctuation is what it
does for plain English captions, so we do that in Python and call the scorers directly.
"""
from __future__ import annotations

import re
from typing import Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider


def tokenize_caption(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def caption_scores(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """``bleu4`` and ``cider`` of predictions against one or more references each."""
    gts, res = {}, {}
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        refs = [refs] if isinstance(refs, str) else list(refs)
        gts[i] = [tokenize_caption(r) for r in refs]
        res[i] = [tokenize_caption(pred) or "<empty>"]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider), "n": len(predictions)}
