import pytest
import torch

from defend.data import load_samples
from defend.models import load_model
from defend.models.diffusion_sampler import diffusion_generate, tokens_per_step


@pytest.fixture(scope="module")
def mdlm(tmp_path_factory):
    from defend.config import load_config
    from tests.conftest import TINY_TEST_OVERRIDES

    cfg = load_config(None, [*TINY_TEST_OVERRIDES, "model.family=mdlm", "dataset.max_samples=6",
                             "diffusion.gen_length=6", "diffusion.steps=6", "diffusion.block_length=3"])
    torch.manual_seed(0)
    vlm = load_model(cfg)
    vlm.model.eval()
    return vlm, load_samples(cfg.dataset)


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_a_batch_costs_exactly_steps_language_model_passes(mdlm):
    vlm, samples = mdlm
    lm_calls, h1 = count_calls(vlm.model.model.language_model)
    vision_calls, h2 = count_calls(vlm.model.model.vision_tower)
    try:
        texts = vlm.generate(vlm.generate_collator()(samples))
    finally:
        h1.remove()
        h2.remove()
    assert len(texts) == len(samples)
    assert len(lm_calls) == vlm.cfg.diffusion.steps == 6
    assert len(vision_calls) == 1  # image features are computed once per batch


def embed(vlm, tokens, features):
    """The oracle of the vision-token seam: token embeddings with the image placeholders replaced."""
    embeds = vlm.model.get_input_embeddings()(tokens)
    image = (tokens == vlm.model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(image, features.to(embeds.dtype))


def raw_tokens(vlm, batch):
    features = vlm.image_features(batch)
    from defend.models.archs.base import position_ids_for

    def logits_fn(tokens, mask):
        return vlm.model(inputs_embeds=embed(vlm, tokens, features), attention_mask=mask,
                         position_ids=position_ids_for(mask)).logits

    d = vlm.cfg.diffusion
    return diffusion_generate(logits_fn, batch["input_ids"], batch["attention_mask"], vlm.mask_token_id,
                              d.gen_length, d.steps, d.block_length)


def test_left_padding_gives_the_same_tokens_as_no_padding(mdlm):
    vlm, samples = mdlm
    collate = vlm.generate_collator()
    by_length = sorted(samples, key=lambda s: len(s.prompt))
    short, long = by_length[0], by_length[-1]
    together = collate([short, long])
    assert (together["attention_mask"][0] == 0).any(), "the short prompt must be left-padded"
    alone = raw_tokens(vlm, collate([short]))
    padded = raw_tokens(vlm, together)
    assert torch.equal(alone[0], padded[0])
    assert not (padded == vlm.mask_token_id).any()  # every position was filled


def test_every_row_is_filled_block_by_block():
    """A fake model that always prefers the leftmost mask: blocks must fill in order."""
    mask_id, vocab, gen, block = 9, 10, 6, 3
    order = []

    def logits_fn(tokens, mask):
        gen_part = tokens[:, -gen:]
        order.append((gen_part == mask_id).sum(1).tolist())
        logits = torch.zeros(*tokens.shape, vocab)
        logits[..., 1] = torch.linspace(5, 1, tokens.shape[1])  # earlier positions more confident
        return logits

    prompt = torch.tensor([[0, 2, 3], [4, 5, 6]])
    out = diffusion_generate(logits_fn, prompt, torch.ones_like(prompt), mask_id, gen, steps=4, block_length=block)
    assert torch.equal(out, torch.ones(2, gen, dtype=torch.long))
    assert order == [[6, 6], [4, 4], [3, 3], [1, 1]]  # 2 + 1 commits in block 1, then 2 + 1 in block 2


def test_tokens_per_step_spreads_commits_evenly():
    assert tokens_per_step(8, 3) == [3, 3, 2]
    assert sum(tokens_per_step(5, 5)) == 5


def test_gumbel_sampling_is_reproducible_with_a_generator():
    def logits_fn(tokens, mask):
        return torch.randn(*tokens.shape, 50, generator=torch.Generator().manual_seed(int(tokens.sum())))

    prompt = torch.tensor([[1, 2, 3]] * 4)
    runs = [diffusion_generate(logits_fn, prompt, torch.ones_like(prompt), 49, 4, 4, 4, temperature=1.0,
                               generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    greedy = diffusion_generate(logits_fn, prompt, torch.ones_like(prompt), 49, 4, 4, 4)
    assert not torch.equal(runs[0], greedy)  # temperature really samples


def test_block_settings_that_cannot_work_are_rejected():
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="multiple of diffusion.block_length"):
        diffusion_generate(lambda t, m: None, prompt, torch.ones_like(prompt), 9, 5, 5, 2)


@pytest.mark.parametrize("shifted", [False, True])
def test_one_step_answer_is_the_argmax_at_the_family_s_scoring_position(mdlm, shifted):
    """A 1-token, 1-step answer is the argmax of the logits that score the masked position: at the
    mask itself, or one position earlier for shifted-logit (Dream-style) models."""
    vlm, samples = mdlm
    d = vlm.cfg.diffusion
    saved = (d.gen_length, d.steps, d.block_length, d.shifted_logits)
    d.gen_length = d.steps = d.block_length = 1
    d.shifted_logits = shifted
    try:
        batch = vlm.generate_collator()(samples)
        answers = vlm.generate(batch)
    finally:
        d.gen_length, d.steps, d.block_length, d.shifted_logits = saved
    from defend.models.archs.base import position_ids_for

    ids = torch.cat([batch["input_ids"], torch.full((len(samples), 1), vlm.mask_token_id)], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones(len(samples), 1, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = vlm.model(inputs_embeds=embed(vlm, ids, vlm.image_features(batch)), attention_mask=mask,
                           position_ids=position_ids_for(mask)).logits
    expected = vlm.decode(logits[:, -2 if shifted else -1].argmax(-1, keepdim=True))
    assert answers == expected
    other = vlm.decode(logits[:, -1 if shifted else -2].argmax(-1, keepdim=True))
    assert answers != other  # the two positions disagree on this model, so the check can fail


@pytest.fixture(params=[False, True], ids=["plain", "shifted"])
def shifted(mdlm, request):
    """The tiny model scored as LLaDA (position i scores token i) and as Dream (position i-1 does)."""
    d = mdlm[0].cfg.diffusion
    d.shifted_logits = request.param
    yield request.param
    d.shifted_logits = False


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cached_step_equals_the_full_forward_while_nothing_changed(mdlm, cache, shifted):
    """The cache's mechanics: right after a block's refresh, a cached step (prefix: the block and the
    rest; dual: the block alone, the cache holding prefix and suffix) gives the full forward's logits."""
    from defend.models.diffusion import CachedScorer

    vlm, samples = mdlm
    batch = vlm.generate_collator()(samples[:3])  # left-padded rows of different lengths
    features = vlm.image_features(batch)
    gen = 8
    tokens = torch.cat([batch["input_ids"], torch.full((3, gen), vlm.mask_token_id)], 1)
    tokens[:, -gen:-gen + 2] = 7  # the first block half committed
    mask = torch.cat([batch["attention_mask"], torch.ones(3, gen, dtype=torch.long)], 1)
    full = CachedScorer(vlm, batch, features, "none")
    cached = CachedScorer(vlm, batch, features, cache)
    with torch.no_grad():
        for lo, hi in [(0, 4), (4, 8)]:
            expected = full.refresh(tokens, mask, lo, hi)
            assert torch.allclose(cached.refresh(tokens, mask, lo, hi), expected, atol=1e-5)
            assert torch.allclose(cached.step(tokens, mask, lo, hi), expected, atol=1e-5)
            assert torch.allclose(cached.step(tokens, mask, lo, hi), expected, atol=1e-5)  # the cache was restored


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_every_token_of_the_block_is_fed_so_a_commit_is_seen_at_the_next_step(mdlm, cache, shifted):
    """Committing the block's last token changes the next cached step's logits: the step runs every
    token of the block (for a shifted model too, whose window ends one position before the block's end),
    only what lies outside the block comes from the cache."""
    from defend.models.diffusion import CachedScorer

    vlm, samples = mdlm
    batch = vlm.generate_collator()(samples[:2])
    features = vlm.image_features(batch)
    tokens = torch.cat([batch["input_ids"], torch.full((2, 8), vlm.mask_token_id)], 1)
    mask = torch.cat([batch["attention_mask"], torch.ones(2, 8, dtype=torch.long)], 1)
    scorer = CachedScorer(vlm, batch, features, cache)
    with torch.no_grad():
        scorer.refresh(tokens, mask, 0, 4)  # block 0 of 2: a suffix is cached (dual)
        before = scorer.step(tokens, mask, 0, 4)
        committed = tokens.clone()
        committed[:, batch["input_ids"].shape[1] + 3] = 7  # the block's last answer position
        after = scorer.step(committed, mask, 0, 4)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_one_step_per_block_is_exact_with_any_cache(mdlm, cache):
    vlm, samples = mdlm
    d = vlm.cfg.diffusion
    saved = (d.gen_length, d.steps, d.block_length, d.cache)
    d.gen_length, d.steps, d.block_length = 8, 2, 4
    try:
        batch = vlm.generate_collator()(samples)
        d.cache = "none"
        plain = vlm.generate(batch)
        d.cache = cache
        assert vlm.generate(batch) == plain
    finally:
        d.gen_length, d.steps, d.block_length, d.cache = saved


def test_blocked_tokens_are_never_written():
    from defend.models.diffusion_sampler import diffusion_generate

    def logits_fn(tokens, mask):  # token 5 always the most likely, 6 second
        logits = torch.zeros(tokens.shape[0], 4, 10)
        logits[..., 5], logits[..., 6] = 3.0, 2.0
        return logits

    prompt = torch.ones(2, 3, dtype=torch.long)
    free = diffusion_generate(logits_fn, prompt, torch.ones_like(prompt), 9, 4, 4, 4)
    blocked = diffusion_generate(logits_fn, prompt, torch.ones_like(prompt), 9, 4, 4, 4, blocked_token_ids=[5])
    assert (free == 5).all() and (blocked == 6).all()
