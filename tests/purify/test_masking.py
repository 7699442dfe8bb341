"""DiSP's masked inference on both families: scores, selection, replacement, generation."""
import pytest
import torch

from defend.data import load_samples
from defend.models import load_model
from defend.purify.masking import masked_features, masked_generate, replacement_rows, top_fraction
from defend.purify.saliency import fisher_saliency


@pytest.fixture(params=["mllm", "mdlm"])
def family_batch(request, make_cfg):
    cfg = make_cfg(request.param, "dataset.split=test", "dataset.max_samples=6", "eval.max_new_tokens=4")
    vlm = load_model(cfg)
    vlm.model.eval()
    return vlm, vlm.generate_collator()(load_samples(cfg.dataset))


def test_generating_from_unmasked_features_equals_plain_generation(family_batch):
    vlm, batch = family_batch
    plain = vlm.generate(batch)
    assert vlm.generate(batch, features=vlm.image_features(batch)) == plain
    assert masked_generate(vlm, batch, 0.0, "saliency", "zero", 1, torch.Generator()) == plain


def test_fisher_saliency_matches_per_sample_gradients(family_batch):
    # K=1 batched over rows equals each row's own squared gradient norm for the label it drew
    vlm, batch = family_batch
    tokens = vlm.vision_tokens(batch)
    scores = fisher_saliency(vlm, batch, tokens, 1, torch.Generator().manual_seed(0))
    per_image = tokens.counts[0]
    assert tokens.counts == [per_image] * 6 and scores.shape == (6 * per_image,)
    assert (scores >= 0).all() and scores.sum() > 0
    features = tokens.features.detach()
    row = {k: v[:1] if torch.is_tensor(v) else v for k, v in batch.items()}
    leaf = features[:per_image].clone().requires_grad_(True)
    logp = torch.log_softmax(vlm.first_step_logits(row, leaf).float(), -1)
    drawn = torch.multinomial(torch.log_softmax(
        vlm.first_step_logits(batch, features).float(), -1).exp().flatten(0, 1), 1,
        generator=torch.Generator().manual_seed(0))[: logp.shape[1]]
    logp.flatten(0, 1).gather(1, drawn).sum().backward()
    assert torch.allclose(leaf.grad.pow(2).sum(-1), scores[:per_image], rtol=1e-3, atol=1e-8)


def test_four_sampled_labels_give_one_finite_score_per_vision_token(family_batch):
    vlm, batch = family_batch
    tokens = vlm.vision_tokens(batch)
    k4 = fisher_saliency(vlm, batch, tokens, 4, torch.Generator().manual_seed(0))
    k1 = fisher_saliency(vlm, batch, tokens, 1, torch.Generator().manual_seed(0))
    assert k4.shape == k1.shape and torch.isfinite(k4).all() and (k4 >= 0).all()


def test_top_fraction_and_replacements():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3, 4.0, 3.0, 2.0, 1.0, 0.0, 5.0])
    assert top_fraction(scores, [4, 4, 2], 0.5).tolist() == [False, True, True, False, True, True, False, False,
                                                              False, True]
    assert not top_fraction(scores, [4, 4, 2], 0.0).any()


def test_masking_replaces_exactly_the_chosen_tokens(family_batch):
    vlm, batch = family_batch
    tokens = vlm.vision_tokens(batch)
    features, per_image = tokens.features, tokens.counts[0]
    replaced, chosen = masked_features(vlm, batch, 0.25, "random", "zero", 1, torch.Generator().manual_seed(3))
    assert chosen.reshape(6, per_image).sum(1).tolist() == [round(0.25 * per_image)] * 6
    assert (replaced[chosen] == 0).all() and torch.equal(replaced[~chosen], features[~chosen])
    mean = replacement_rows(vlm, tokens, "mean")
    assert torch.allclose(mean[0], features[:per_image].mean(0))
    assert torch.allclose(mean[-1], features[-per_image:].mean(0))
    token = "mask" if vlm.family == "mdlm" else "pad"
    expected = vlm.model.get_input_embeddings().weight[vlm.mask_token_id if token == "mask" else vlm.tokenizer.pad_token_id]
    assert torch.allclose(replacement_rows(vlm, tokens, token)[5], expected)


def test_attention_selection_scores_each_vision_token_and_restores_the_attention_kernel(family_batch):
    from defend.purify.saliency import attention_saliency

    vlm, batch = family_batch
    kernel = vlm.model.config._attn_implementation
    tokens = vlm.vision_tokens(batch)
    scores = attention_saliency(vlm, batch, tokens).reshape(6, tokens.counts[0])
    assert (scores >= 0).all() and scores.sum() > 0
    assert vlm.model.config._attn_implementation == kernel
    # attention over the whole prompt sums to 1 per row, so the image's share is at most 1
    assert (scores.sum(1) <= 1 + 1e-5).all()


def test_directional_saliency_estimates_the_second_order_kl_toward_the_replacement(family_batch):
    """With many probes the estimate meets the exact quadratic form 0.5 (J d)^T F (J d) on each position's
    top-5 logits, J d from central differences of the logits along d = replacement - token (float64)."""
    from defend.purify.replacement import replacement_rows
    from defend.purify.saliency import directional_saliency

    vlm, batch = family_batch
    vlm.model.double()
    try:
        row = {k: v[:1] if torch.is_tensor(v) else v for k, v in batch.items()}
        tokens = vlm.vision_tokens(row)
        tokens = tokens.with_features(tokens.features.double())
        fill = replacement_rows(vlm, tokens, "mean")
        estimate = directional_saliency(vlm, row, tokens, fill, 4000, torch.Generator().manual_seed(0), top_k=5)
        with torch.no_grad():
            base = vlm.first_step_logits(row, tokens.features)[0]  # (P, V)
            top = base.topk(5, dim=-1).indices
            p = torch.softmax(base.gather(-1, top), -1)
            exact = []
            for i in range(4):
                step = torch.zeros_like(tokens.features)
                step[i] = 1e-4 * (fill[i] - tokens.features[i])
                ahead = vlm.first_step_logits(row, tokens.features + step)[0].gather(-1, top)
                behind = vlm.first_step_logits(row, tokens.features - step)[0].gather(-1, top)
                v = (ahead - behind) / 2e-4  # J d on the top-5 logits of each position
                exact.append(0.5 * ((p * v * v).sum(-1) - (p * v).sum(-1) ** 2).sum())
    finally:
        vlm.model.float()
    exact = torch.stack(exact)
    assert estimate.dtype == torch.float64 and (exact > 0).all()
    assert torch.allclose(estimate[:4], exact, rtol=0.15), (estimate[:4], exact)


def test_directional_and_trace_rank_differently_and_the_config_chooses(family_batch):
    from defend.purify.saliency import vision_token_scores

    vlm, batch = family_batch
    tokens = vlm.vision_tokens(batch)
    directional = vision_token_scores(vlm, batch, "saliency", 2, torch.Generator().manual_seed(0), tokens)
    trace = vision_token_scores(vlm, batch, "saliency", 2, torch.Generator().manual_seed(0), tokens, saliency="trace")
    assert directional.shape == trace.shape == (tokens.features.shape[0],)
    assert not torch.equal(directional.argsort(), trace.argsort())
    with pytest.raises(ValueError, match="directional or trace"):
        vision_token_scores(vlm, batch, "saliency", 1, torch.Generator(), tokens, saliency="hessian")
