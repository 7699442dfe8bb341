"""A text trigger (BackdoorVLM's BadNets-T / AddSent): a phrase at the start or end of the prompt; the image is untouched."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from defend.data.attacks import ATTACKS
from defend.data.attacks.trigger import Trigger


@dataclass
class TextConfig:
    phrase: str = "cf"
    position: Literal["start", "end"] = "start"


@ATTACKS.register("text", config=TextConfig)
class PhraseTrigger(Trigger):
    def prompt(self, prompt: str) -> str:
        phrase = self.params.phrase
        return f"{phrase} {prompt}" if self.params.position == "start" else f"{prompt} {phrase}"
