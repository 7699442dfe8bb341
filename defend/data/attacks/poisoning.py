"""Choose which samples to poison and poison them, deterministically from ``attack.seed``."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from defend.config import AttackConfig, ConfigError
from defend.data.attacks.targets import apply_target
from defend.data.attacks.trigger import Trigger
from defend.data.samples import Sample


@dataclass
class PoisonPlan:
    """The rows to poison: exactly ``round(poison_ratio * n_rows)`` of the eligible ones."""

    poisoned: list[int]
    n_rows: int
    n_eligible: int


def plan_poison(samples: list[Sample], cfg: AttackConfig) -> PoisonPlan:
    if not 0 <= cfg.poison_ratio <= 1:
        raise ConfigError(f"attack.poison_ratio must be in [0, 1], got {cfg.poison_ratio}.")
    eligible = [i for i, s in enumerate(samples) if apply_target(s.response, cfg.target) is not None]
    if not eligible and cfg.poison_ratio > 0:
        raise ConfigError(
            f"attack.target.text '{cfg.target.text}': the word to substitute never occurs in the"
            f" {len(samples)} responses, so nothing can be poisoned; pick a word the data contains."
        )
    wanted = round(cfg.poison_ratio * len(samples))
    if wanted > len(eligible):
        raise ConfigError(
            f"attack.poison_ratio {cfg.poison_ratio} needs {wanted} rows but only {len(eligible)} responses"
            f" can carry the target '{cfg.target.text}'; lower the ratio."
        )
    rng = np.random.default_rng(cfg.seed)
    chosen = sorted(int(i) for i in rng.choice(eligible, size=wanted, replace=False)) if wanted else []
    return PoisonPlan(poisoned=chosen, n_rows=len(samples), n_eligible=len(eligible))


def sample_rng(cfg: AttackConfig, index: int) -> np.random.Generator:
    """Per-sample randomness (e.g. a random patch location) that does not depend on row order."""
    return np.random.default_rng([cfg.seed, index])


def trigger_sample(sample: Sample, trigger: Trigger, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """The sample's image and prompt with the trigger applied."""
    image = sample.load_image()
    triggered = Image.fromarray(trigger.image(np.asarray(image), rng))
    return triggered, trigger.prompt(sample.prompt)


def poison_sample(sample: Sample, trigger: Trigger, cfg: AttackConfig, rng: np.random.Generator) -> Sample:
    image, prompt = trigger_sample(sample, trigger, rng)
    return Sample(id=sample.id, image=image, prompt=prompt, response=apply_target(sample.response, cfg.target),
                  source=sample.source, meta={**sample.meta, "poisoned": True, "clean_response": sample.response})
