"""PCR: patch-based cross-view regularization (arXiv 2604.04488), for both model families.

Every image is seen twice in one forward: as it is (view 0) and with a fraction of its patches
perturbed (view 1). On the tokens the task loss scores, the loss adds

    discrepancy_weight * mean agreement(p_0, p_1)        (pulls the views apart, bounded in [0, w])
    entropy_weight     * mean max(0, entropy_target - H(p_1) / log V)   (the perturbed view stays uncertain)

and gates the task loss: each response token's term is multiplied by ``p_1(label) ** label_gate``
unless the label is among ``p_1``'s top ``label_gate_top_k`` (a backdoor target the model has not
tied to the trigger yet hardly trains). docs/pcr.md gives the reasons and the runs behind each
choice and default.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from defend.config import ConfigError
from defend.data.patch_augment import patch_augment
from defend.engine.distributed import rank
from defend.models.scoring import ResponseScores
from defend.objectives.base import Objective, TrainingContext, register
from defend.objectives.divergence import agreement, entropy
from defend.objectives.settings import PcrConfig
from defend.seeds import PCR_PATCHES, derive_seed


@register("pcr", config=PcrConfig)
class PatchCrossView(Objective):
    views = 2

    def __init__(self, ctx: TrainingContext):
        super().__init__(ctx)
        self.cfg = ctx.cfg.objective.pcr
        if not 0 < self.cfg.fraction <= 1:
            raise ConfigError(f"objective.pcr.fraction must be in (0, 1], got {self.cfg.fraction}.")
        if self.cfg.patch_size < 1:
            raise ConfigError(f"objective.pcr.patch_size must be >= 1, got {self.cfg.patch_size}.")
        # each rank perturbs its own images differently
        self.generators = {"patches": torch.Generator().manual_seed(derive_seed(ctx.cfg.seed, PCR_PATCHES, rank()))}

    def add_views(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not batch["image_rows"].any():
            raise ConfigError("objective.name=pcr: a training batch has no images; PCR perturbs images.")
        cfg, arch = self.cfg, self.ctx.vlm.arch

        def perturb(images: torch.Tensor) -> torch.Tensor:
            return patch_augment(images, cfg.patch_size, cfg.fraction, cfg.mode, self.generators["patches"],
                                 cfg.noise_std)

        try:  # every image (every anyres crop; Qwen2-VL's patches as pixels again), the architecture's way
            perturbed = arch.perturb_pixels(batch, perturb)
        except ValueError as err:
            raise ConfigError(f"objective.pcr: {err}.") from err
        doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in batch.items()}
        doubled["pixel_values"] = torch.cat([batch["pixel_values"], perturbed])
        return doubled

    def loss_scale(self, scores: ResponseScores, batch: dict[str, Any], step: int) -> torch.Tensor | None:
        """The label gate: each scored token's task loss times the perturbed view's probability of its
        label, to the power ``label_gate`` (detached). A label the perturbed image does not support
        (a backdoor target the model has not yet tied to the trigger) hardly trains."""
        if not self.cfg.label_gate:
            return None
        n = scores.rows
        gated = scored_with_image(scores, batch)
        gate = torch.ones(gated.shape, device=gated.device)
        logp = torch.log_softmax(scores.view(1)[gated].detach().float(), dim=-1)  # scored tokens only
        label_logp = logp.gather(-1, scores.targets[:n][gated].unsqueeze(-1))
        support = label_logp.squeeze(-1).exp().pow(self.cfg.label_gate)
        if self.cfg.label_gate_top_k:  # a label among the perturbed view's top k trains in full
            rank = (logp > label_logp).sum(-1)
            support = torch.where(rank < self.cfg.label_gate_top_k, torch.ones_like(support), support)
        gate[gated] = support
        return gate

    def terms(self, scores: ResponseScores, batch: dict[str, Any], step: int, model) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        scored = scored_with_image(scores, batch)
        original, perturbed = scores.view(0)[scored], scores.view(1)[scored]
        if original.shape[0] == 0:
            zero = scores.logits.sum() * 0
            return {"pcr_discrepancy": zero, "pcr_entropy": zero}
        anchor = original.detach() if cfg.detach_original else original
        alike = agreement(cfg.divergence, anchor, perturbed).mean()
        uncertainty = entropy(perturbed) / math.log(perturbed.shape[-1])
        return {"pcr_discrepancy": cfg.discrepancy_weight * alike,
                "pcr_entropy": cfg.entropy_weight * (cfg.entropy_target - uncertainty).clamp(min=0).mean()}


def scored_with_image(scores: ResponseScores, batch: dict[str, Any]) -> torch.Tensor:
    """(n, L) bool: the scored tokens of view 0's rows that carry an image (a text-only row has two
    identical views; diffusion noise copies repeat the rows)."""
    with_image = batch["image_rows"][: scores.rows // scores.copies].repeat(scores.copies)
    return scores.scored & with_image.unsqueeze(1)
