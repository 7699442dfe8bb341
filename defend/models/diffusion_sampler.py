"""Batched masked-diffusion sampling: LLaDA's (semi-autoregressive blocks, remasking) and Dream's (one
block, a commit count from a linear time schedule, confidence by max probability, margin or entropy).

Every row shares the layout (left-padded prompt, then ``gen_length`` masks), so each step commits
the same number of tokens in every row: one forward pass per step for the whole batch.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from defend.config import ConfigError


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max sampling in float64: low precision Gumbel noise degrades quality (LLaDA)."""
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def tokens_per_step(block_masks: int, steps: int) -> list[int]:
    """Spread ``block_masks`` commits over ``steps`` as evenly as possible, earlier steps first."""
    base, extra = divmod(block_masks, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def check_sampler_settings(d) -> None:
    """``diffusion.*`` sampler settings that fit together (a ``DiffusionConfig``); raises ConfigError."""
    if d.gen_length < 1 or d.steps < 1:
        raise ConfigError(f"diffusion.gen_length and diffusion.steps: must be at least 1, got {d.gen_length} and"
                          f" {d.steps}.")
    if d.prefix_lm and d.sampler != "dream":
        raise ConfigError("diffusion.prefix_lm: LaViDa's prefix-LM decoding runs with Dream's sampler; set"
                          " diffusion.sampler=dream, or diffusion.prefix_lm=false (diffusion.cache=prefix is LLaDA's).")
    if d.top_k < 0:
        raise ConfigError(f"diffusion.top_k: the number of largest logits kept (0: all), got {d.top_k}.")
    if d.sampler == "llada":
        if d.gen_length % d.block_length:
            raise ConfigError(f"diffusion.gen_length ({d.gen_length}) must be a multiple of diffusion.block_length"
                              f" ({d.block_length}).")
        if d.steps % (d.gen_length // d.block_length):
            raise ConfigError(f"diffusion.steps ({d.steps}) must be a multiple of the block count"
                              f" ({d.gen_length // d.block_length}).")


class BlockScorer(Protocol):
    """Logits of the answer positions ``lo:hi`` (a block) of ``tokens`` (B, prompt + gen_length).

    ``refresh`` is called at each block's first step and may keep state (a KV cache) that ``step``,
    called at the block's other steps, reuses."""

    def refresh(self, tokens: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor: ...


class Uncached:
    """Every step a full forward: ``logits_fn(tokens, mask)`` scores the last ``gen_length`` positions."""

    def __init__(self, logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], gen_length: int):
        self.logits_fn, self.gen_length = logits_fn, gen_length

    def refresh(self, tokens, attention_mask, lo, hi):
        return self.logits_fn(tokens, attention_mask)[:, -self.gen_length:][:, lo:hi]

    step = refresh


@torch.no_grad()
def diffusion_generate(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | BlockScorer,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_token_id: int,
    gen_length: int,
    steps: int,
    block_length: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | None = None,
    blocked_token_ids: list[int] | None = None,
) -> torch.Tensor:
    """Fill ``gen_length`` masked positions after left-padded prompts in exactly ``steps`` passes.

    Args:
        logits_fn: ``(tokens (B, L), attention_mask (B, L)) -> logits`` whose last ``gen_length``
            positions score the answer tokens (a model may compute only those); or a ``BlockScorer``
            (a cached sampler: the block's logits only).
        prompt_ids: (B, P) left-padded prompts; ``attention_mask`` marks the real tokens.
        blocked_token_ids: never written at a masked position (LLaDA-V: eos/bos and the chat headers).
    Returns:
        (B, gen_length) generated tokens.
    """
    if gen_length % block_length:
        raise ValueError(f"diffusion.gen_length ({gen_length}) must be a multiple of diffusion.block_length ({block_length}).")
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(f"diffusion.steps ({steps}) must be a multiple of the block count ({blocks}).")
    scorer = logits_fn if hasattr(logits_fn, "refresh") else Uncached(logits_fn, gen_length)
    steps_per_block = steps // blocks
    batch, prompt_len = prompt_ids.shape
    x = torch.cat([prompt_ids, prompt_ids.new_full((batch, gen_length), mask_token_id)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_ones((batch, gen_length))], dim=1)
    for block in range(blocks):
        lo, hi = block * block_length, (block + 1) * block_length
        for n, k in enumerate(tokens_per_step(block_length, steps_per_block)):
            logits = (scorer.refresh if n == 0 else scorer.step)(x, mask, lo, hi)  # (B, block, V)
            if blocked_token_ids:
                logits = logits.clone()
                logits[..., blocked_token_ids] = -torch.inf
            sampled = add_gumbel_noise(logits, temperature, generator) if temperature > 0 else logits
            x0 = sampled.argmax(-1)
            if remasking == "low_confidence":
                confidence = F.softmax(logits.float(), dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                confidence = torch.rand(x0.shape, device=x0.device, generator=generator)
            window = x[:, prompt_len + lo: prompt_len + hi]
            confidence = torch.where(window == mask_token_id, confidence, -torch.inf)
            if k:
                chosen = confidence.topk(k, dim=-1).indices
                window.scatter_(1, chosen, x0.gather(1, chosen))
    return x[:, prompt_len:]


def dream_commits(masks: int, steps: int, eps: float) -> list[int]:
    """Dream's schedule: at step i of ``steps`` on times t = linspace(1, eps), int(m * (1 - s/t)) of the
    m still masked are committed (s the next time), the last step commits what is left."""
    times = torch.linspace(1, eps, steps + 1).tolist()
    counts = []
    for i in range(steps):
        k = int(masks * (1 - times[i + 1] / times[i])) if i < steps - 1 else masks
        counts.append(k)
        masks -= k
    return counts


def dream_confidence(logits: torch.Tensor, alg: str, top_k: int, temperature: float,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, token) per position: probabilities over the ``top_k`` largest logits (0: all), the
    argmax (temperature 0) or a sample; confidence its probability (maskgit_plus), top1 - top2
    (topk_margin) or the negative entropy (entropy)."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[..., -1:], -torch.inf)
    probs = F.softmax(logits, dim=-1)
    if temperature > 0:
        token = torch.multinomial(probs.flatten(0, -2), 1, generator=generator).view(probs.shape[:-1])
        confidence = probs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, token = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        confidence = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        confidence = (probs * torch.log(probs + 1e-10)).sum(-1)
    elif alg != "maskgit_plus":
        raise ValueError(f"diffusion.dream_alg: unknown {alg!r}; use maskgit_plus, topk_margin or entropy.")
    return confidence, token


@torch.no_grad()
def dream_generate(
    scorer: BlockScorer,
    prompt_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_token_id: int,
    gen_length: int,
    steps: int,
    alg: str = "topk_margin",
    top_k: int = 0,
    eps: float = 1e-3,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    blocked_token_ids: list[int] | None = None,
    first_tokens: torch.Tensor | None = None,
    trace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dream's sampler (``DreamGenerationMixin._sample``) over ``gen_length`` masks after left-padded
    prompts: the answer is one block, ``steps`` forwards. ``first_tokens`` (B,), when given, fill the
    first answer position before the first step (LaViDa's prefix-LM decoding). ``trace`` collects the
    answer after every step. Returns (B, gen_length) tokens."""
    batch, prompt_len = prompt_ids.shape
    x = torch.cat([prompt_ids, prompt_ids.new_full((batch, gen_length), mask_token_id)], dim=1)
    if first_tokens is not None:
        x[:, prompt_len] = first_tokens
    mask = torch.cat([attention_mask, attention_mask.new_ones((batch, gen_length))], dim=1)
    masks = int((x[0, prompt_len:] == mask_token_id).sum())
    for n, k in enumerate(dream_commits(masks, steps, eps)):
        logits = (scorer.refresh if n == 0 else scorer.step)(x, mask, 0, gen_length)  # (B, gen_length, V)
        if blocked_token_ids:
            logits = logits.clone()
            logits[..., blocked_token_ids] = -torch.inf
        confidence, token = dream_confidence(logits, alg, top_k, temperature, generator)
        answer = x[:, prompt_len:]
        confidence = torch.where(answer == mask_token_id, confidence, -torch.inf)
        if k:
            chosen = confidence.topk(k, dim=-1).indices
            answer.scatter_(1, chosen, token.gather(1, chosen))
        if trace is not None:
            trace.append(answer.clone())
    return x[:, prompt_len:]
