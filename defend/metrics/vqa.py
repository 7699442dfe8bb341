"""VQA accuracy: normalized exact match, overall and per question type."""
from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from typing import Sequence

ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, fold whitespace (as the VQA evaluation does)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in re.split(r"\s+", text) if w and w not in ARTICLES)


def vqa_accuracy(predictions: Sequence[str], references: Sequence[str],
                 question_types: Sequence[str] | None = None) -> dict:
    """Accuracy with its counts, per question type when given, and the majority-answer baseline."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    correct = [normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)]
    n = len(correct)
    majority, majority_count = Counter(normalize_answer(r) for r in references).most_common(1)[0]
    result = {
        "vqa_accuracy": sum(correct) / n,
        "n": n,
        "n_correct": sum(correct),
        "majority_answer": majority,
        "majority_baseline": majority_count / n,
    }
    if question_types is not None:
        groups: dict[str, list[bool]] = defaultdict(list)
        for kind, ok in zip(question_types, correct):
            groups[kind].append(ok)
        result["by_question_type"] = {
            kind: {"vqa_accuracy": sum(oks) / len(oks), "n": len(oks), "n_correct": sum(oks)}
            for kind, oks in sorted(groups.items())
        }
    return result
