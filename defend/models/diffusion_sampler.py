"""Batched masked-diffusion sampling (LLaDA): semi-autoregressive blocks, remasking.

Every row shares the layout (left-padded prompt, then ``gen_length`` masks), so each step commits
the same number of tokens in every row: one forward pass per step for the whole batch.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max sampling in float64: low precision Gumbel noise degrades quality (LLaDA)."""
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def tokens_per_step(block_masks: int, steps: int) -> list[int]:
    """Spread ``block_masks`` commits over ``steps`` as evenly as possible, earlier steps first."""
    base, extra = divmod(block_masks, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


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
