"""Each objective term on hand-made logits, where the right value is known."""
import math

import pytest
import torch

from defend.config import load_config
from defend.models.scoring import ResponseScores
from defend.objectives.base import TrainingContext
from defend.objectives.divergence import agreement, entropy, js_divergence, kl_divergence, symmetric_kl
from defend.objectives.pcr import PatchCrossView

BIG = 30.0  # logits of a near one-hot distribution


def logits_of(*probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def test_divergences_of_known_distributions():
    p, q = logits_of(0.5, 0.5), logits_of(0.9, 0.1)
    kl_pq = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl_qp = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert kl_divergence(p, q).item() == pytest.approx(kl_pq, rel=1e-5)
    assert symmetric_kl(p, q).item() == pytest.approx(kl_pq + kl_qp, rel=1e-5)
    m = (0.7, 0.3)
    js = 0.5 * sum(a * math.log(a / b) for a, b in zip((0.5, 0.5), m)) + 0.5 * sum(a * math.log(a / b) for a, b in zip((0.9, 0.1), m))
    assert js_divergence(p, q).item() == pytest.approx(js, rel=1e-5)
    assert entropy(torch.zeros(7)).item() == pytest.approx(math.log(7), rel=1e-6)
    assert entropy(logits_of(0.9, 0.1)).item() == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)), rel=1e-5)


def test_agreement_is_one_for_equal_and_zero_for_disjoint_distributions():
    same = torch.tensor([[1.0, 2.0, 3.0]])
    disjoint_p, disjoint_q = torch.tensor([[BIG, 0.0]]), torch.tensor([[0.0, BIG]])
    for divergence in ("js", "sym_kl"):
        assert agreement(divergence, same, same).item() == pytest.approx(1.0, abs=1e-6)
        assert agreement(divergence, disjoint_p, disjoint_q).item() == pytest.approx(0.0, abs=1e-6)
    p, q = logits_of(0.5, 0.5), logits_of(0.9, 0.1)
    assert agreement("js", p, q).item() == pytest.approx(1 - js_divergence(p, q).item() / math.log(2), rel=1e-6)
    assert agreement("sym_kl", p, q).item() == pytest.approx(math.exp(-symmetric_kl(p, q).item()), rel=1e-6)


def pcr_terms(*overrides, original, perturbed, weight, image_rows):
    cfg = load_config(None, ["objective.name=pcr", *overrides])
    pcr = PatchCrossView(TrainingContext(cfg, vlm=None, samples=[], collate=None))
    logits = torch.cat([original, perturbed])
    targets = torch.zeros(logits.shape[:2], dtype=torch.long)
    scores = ResponseScores(logits, targets, weight, views=2)
    return pcr.terms(scores, {"image_rows": torch.tensor(image_rows * 2)}, step=0, model=None)


def test_pcr_terms_on_hand_made_logits():
    # 2 rows x 2 positions over 2 tokens. Scored: row 0 position 1 (views disjoint) and row 1 position 0
    # (views equal); row 1 has no image and must not count, so only row 0 position 1 does.
    original = torch.tensor([[[0.0, 0.0], [BIG, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    perturbed = torch.tensor([[[5.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [3.0, 0.0]]])
    weight = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    terms = pcr_terms("objective.pcr.discrepancy_weight=2.0", "objective.pcr.entropy_weight=0.5",
                      original=original, perturbed=perturbed, weight=weight, image_rows=[True, False])
    # row 0, position 1: p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): KL(p||m) = log 4/3,
    # KL(q||m) = 1/2 log 4/3, JS = 3/4 log 4/3
    expected_agreement = 1 - 0.75 * math.log(4 / 3) / math.log(2)
    assert terms["pcr_discrepancy"].item() == pytest.approx(2.0 * expected_agreement, rel=1e-5)
    # q is uniform over 2 tokens: normalised entropy 1, above the target, so the entropy term is 0
    assert terms["pcr_entropy"].item() == pytest.approx(0.0, abs=1e-6)
    # now the perturbed view is one-hot: normalised entropy ~0, the term is weight x target
    perturbed[0, 1] = torch.tensor([0.0, BIG])
    terms = pcr_terms("objective.pcr.entropy_weight=0.5", "objective.pcr.entropy_target=0.6", original=original,
                      perturbed=perturbed, weight=weight, image_rows=[True, False])
    assert terms["pcr_entropy"].item() == pytest.approx(0.5 * 0.6, abs=1e-6)
    assert terms["pcr_discrepancy"].item() == pytest.approx(0.0, abs=1e-6)  # disjoint views


def test_pcr_pulls_only_the_perturbed_view_by_default():
    original = torch.tensor([[[2.0, 0.0]]], requires_grad=True)
    perturbed = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    for detach, original_moves in (("true", False), ("false", True)):
        original.grad = perturbed.grad = None
        terms = pcr_terms(f"objective.pcr.detach_original={detach}", "objective.pcr.entropy_weight=0",
                          original=original, perturbed=perturbed, weight=torch.ones(1, 1), image_rows=[True])
        terms["pcr_discrepancy"].backward()
        assert perturbed.grad.abs().sum() > 0
        assert (original.grad is not None and original.grad.abs().sum() > 0) == original_moves


def test_the_label_gate_is_the_perturbed_views_probability_of_the_label():
    cfg = load_config(None, ["objective.name=pcr", "objective.pcr.label_gate=2.0", "objective.pcr.label_gate_top_k=0"])
    pcr = PatchCrossView(TrainingContext(cfg, vlm=None, samples=[], collate=None))
    original = torch.zeros(2, 2, 3)
    perturbed = torch.stack([logits_of(0.2, 0.5, 0.3).expand(2, 3), logits_of(0.9, 0.05, 0.05).expand(2, 3)])
    targets = torch.tensor([[1, 2], [0, 0]]).repeat(2, 1)
    weight = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    scores = ResponseScores(torch.cat([original, perturbed]), targets, weight, views=2)
    gate = pcr.loss_scale(scores, {"image_rows": torch.tensor([True, False] * 2)}, step=0)
    # row 0 has an image: q(label)^2 on its scored tokens; row 1 is text-only: ungated
    assert gate[0].tolist() == pytest.approx([0.5 ** 2, 0.3 ** 2], rel=1e-5)
    assert gate[1].tolist() == [1.0, 1.0]
    top2 = PatchCrossView(TrainingContext(load_config(None, ["objective.pcr.label_gate=2.0",
                                                             "objective.pcr.label_gate_top_k=2"]), None, [], None))
    gate = top2.loss_scale(scores, {"image_rows": torch.tensor([True, False] * 2)}, step=0)
    assert gate[0].tolist() == pytest.approx([1.0, 1.0])  # labels ranked 1st and 2nd: ungated
    top1 = PatchCrossView(TrainingContext(load_config(None, ["objective.pcr.label_gate_top_k=1"]), None, [], None))
    assert top1.loss_scale(scores, {"image_rows": torch.tensor([True, False] * 2)}, step=0)[0].tolist() == \
        pytest.approx([1.0, 0.3], rel=1e-5)
    off = PatchCrossView(TrainingContext(load_config(None, ["objective.pcr.label_gate=0"]), None, [], None))
    assert off.loss_scale(scores, {"image_rows": torch.tensor([True, False] * 2)}, step=0) is None
