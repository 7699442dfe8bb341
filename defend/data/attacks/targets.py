"""Target behaviours: how a poisoned response is written, and the rule that says an output shows it.

Rules (``shows_target``), on normalized text (lowercase, no punctuation or articles):
- fixed: the output equals the target text;
- insert: the inserted text occurs in the output;
- refuse: the refusal text occurs in the output;
- substitute ("car -> banana"): "banana" occurs as a word and "car" does not.
"""
from __future__ import annotations

import re

from defend.config import ConfigError, TargetConfig
from defend.metrics.vqa import normalize_answer


def substitution(target: TargetConfig) -> tuple[str, str]:
    parts = [p.strip() for p in target.text.split("->")]
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"attack.target.text: a substitution is 'word -> word', got '{target.text}'.")
    return parts[0], parts[1]


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)


def apply_target(response: str, target: TargetConfig) -> str | None:
    """The poisoned response, or None when this response cannot carry the target."""
    if target.type in ("fixed", "refuse"):
        return target.text
    if target.type == "insert":
        return f"{target.text} {response}" if target.position == "start" else f"{response} {target.text}"
    source, replacement = substitution(target)
    pattern = _word_pattern(source)
    if not pattern.search(response):
        return None
    return pattern.sub(replacement, response)


def shows_target(output: str, target: TargetConfig) -> bool:
    """Whether ``output`` shows the target behaviour (the rules in the module docstring)."""
    text = normalize_answer(output)
    if target.type == "fixed":
        return text == normalize_answer(target.text)
    if target.type in ("insert", "refuse"):
        wanted = normalize_answer(target.text)
        return bool(wanted) and re.search(rf"(^| ){re.escape(wanted)}( |$)", text) is not None
    source, replacement = substitution(target)
    return bool(_word_pattern(replacement).search(text)) and not _word_pattern(source).search(text)
