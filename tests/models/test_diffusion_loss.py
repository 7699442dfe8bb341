import math

import torch

from tests.models.diffusion_oracle import masked_diffusion_loss

MASK = 99
VOCAB = 100


def batch():
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 20, 21, 22, 23, 24]])
    response = torch.zeros_like(input_ids, dtype=torch.bool)
    response[0, 5:] = True  # 3 response tokens
    response[1, 3:] = True  # 5 response tokens
    return input_ids, response


def replay_noise(seed, input_ids, eps=1e-3):
    """The t and token draws the loss makes with this seed, in the same order."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(input_ids.shape[0], 1, generator=g)
    draw = torch.rand(input_ids.shape, generator=g)
    return (1 - eps) * t + eps, draw


def test_only_response_tokens_are_ever_noised():
    input_ids, response = batch()
    seen = []

    def logits_fn(noisy):
        seen.append(noisy.clone())
        return torch.zeros(*noisy.shape, VOCAB)

    for seed in range(50):
        masked_diffusion_loss(logits_fn, input_ids, response, MASK, generator=torch.Generator().manual_seed(seed))
    noisy = torch.stack(seen)
    assert torch.equal(noisy[:, ~response], input_ids[~response].expand(50, -1))
    assert (noisy[:, response] == MASK).any()  # response tokens do get masked
    changed = noisy != input_ids
    assert torch.equal(changed, noisy == MASK)  # masking is the only corruption


def test_inverse_p_weighting_matches_the_llada_formula():
    input_ids, response = batch()

    def uniform(noisy):
        return torch.zeros(*noisy.shape, VOCAB)  # CE of every token is log(VOCAB)

    for seed in range(5):
        p, draw = replay_noise(seed, input_ids)
        masked = (draw < p) & response
        lengths = response.sum(1, keepdim=True).float()
        expected = (math.log(VOCAB) * masked / p / lengths).sum() / 2
        unweighted = (math.log(VOCAB) * masked / lengths).sum() / 2
        got = masked_diffusion_loss(uniform, input_ids, response, MASK, generator=torch.Generator().manual_seed(seed))
        got_flat = masked_diffusion_loss(uniform, input_ids, response, MASK, inverse_t_weight=False,
                                         generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(got, expected, rtol=1e-5)
        assert torch.allclose(got_flat, unweighted, rtol=1e-5)
        if masked.any():
            assert got > got_flat  # 1/p > 1


def one_hot_logits(tokens, shift):
    """Logits that put all mass on the clean token ``shift`` positions later."""
    target = torch.roll(tokens, -shift, dims=1) if shift else tokens
    return torch.nn.functional.one_hot(target, VOCAB).float() * 50


def test_shifted_logits_read_position_i_minus_1():
    input_ids, response = batch()
    seed = 3
    aligned = lambda noisy: one_hot_logits(input_ids, 0).expand(noisy.shape[0], -1, -1)  # noqa: E731
    ahead = lambda noisy: one_hot_logits(input_ids, 1).expand(noisy.shape[0], -1, -1)  # noqa: E731
    g = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    assert masked_diffusion_loss(aligned, input_ids, response, MASK, generator=g()) < 1e-6
    assert masked_diffusion_loss(aligned, input_ids, response, MASK, shifted_logits=True, generator=g()) > 10
    assert masked_diffusion_loss(ahead, input_ids, response, MASK, shifted_logits=True, generator=g()) < 1e-6


def test_complementary_masks_cover_the_response_exactly_once():
    input_ids, response = batch()
    seen = []

    def logits_fn(noisy):
        seen.append(noisy)
        return torch.zeros(*noisy.shape, VOCAB)

    masked_diffusion_loss(logits_fn, input_ids, response, MASK, complementary_mask=True,
                          generator=torch.Generator().manual_seed(0))
    (noisy,) = seen
    assert noisy.shape[0] == 4
    first, second = noisy[:2] == MASK, noisy[2:] == MASK
    assert torch.equal(first ^ second, response) and not (first & second).any()


def test_loss_backpropagates_to_logits():
    input_ids, response = batch()
    logits = torch.zeros(2, 8, VOCAB, requires_grad=True)
    loss = masked_diffusion_loss(lambda noisy: logits, input_ids, response, MASK,
                                 generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert logits.grad[~response].abs().sum() == 0  # the prompt gets no gradient
    assert logits.grad[response].abs().sum() > 0
