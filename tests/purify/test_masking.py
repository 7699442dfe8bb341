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
