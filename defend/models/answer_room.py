"""Does an attack's target response fit in one generation? If not, ASR is read off cut-off answers: a
masked-diffusion model decoding two masks cannot write "banana yes" and its end token, whatever it
learned (docs/demo.md: TrojVLM on the mdlm victim)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from defend.config import Config, ConfigError, TargetConfig
from defend.data.attacks.targets import apply_target
from defend.models import families


def check_target_room(cfg: Config, tokenizer: Any, triggered: list[tuple[str, str]], target: TargetConfig) -> None:
    """Raise naming the row and the setting when a triggered row's (id, clean response) target response
    has more tokens than one generation of ``cfg.model.family`` holds under ``cfg``."""
    family = families()[cfg.model.family]
    room, seen = family.answer_room(cfg), set()
    for row_id, response in triggered:
        wanted = apply_target(response, target)
        if wanted is None or wanted in seen:
            continue
        seen.add(wanted)
        n = len(tokenizer(wanted, add_special_tokens=False)["input_ids"])
        if n > room:
            raise ConfigError(
                f"the attack's target response '{wanted}' ({cfg.eval.poison_dir}/test_triggered.jsonl, row"
                f" '{row_id}') is {n} tokens, but one generation holds {room}: ASR would be read off cut-off"
                f" answers. Set {family.room_for(n)}.")


def check_poisoned_room(cfg: Config) -> None:
    """``check_target_room`` for the evaluation ``cfg`` describes (``eval.poison_dir``, ``model.path``'s
    tokenizer), read without loading the model: for a run of many evaluations, before the first."""
    from transformers import AutoTokenizer

    folder = Path(cfg.eval.poison_dir)
    target = TargetConfig(**json.loads((folder / "manifest.json").read_text())["attack"]["target"])
    with open(folder / "test_triggered.jsonl") as f:
        rows = [(r["id"], r["response"]) for r in map(json.loads, f)]
    check_target_room(cfg, AutoTokenizer.from_pretrained(cfg.model.path), rows, target)
