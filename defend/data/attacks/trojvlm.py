"""TrojVLM (Lyu et al. 2024): the BadNets patch, with the target inserted into the response (not replacing it)."""
from __future__ import annotations

from defend.config import ConfigError
from defend.data.attacks import ATTACKS
from defend.data.attacks.badnets import PatchConfig, PatchTrigger


@ATTACKS.register("trojvlm", config=PatchConfig)
class TrojVlmTrigger(PatchTrigger):
    def __init__(self, params: PatchConfig, attack):
        if attack.target.type != "insert":
            raise ConfigError("attack.name=trojvlm inserts its target into the response: set attack.target.type=insert.")
        super().__init__(params, attack)
