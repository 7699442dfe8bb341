"""The vision tokens of a batch, read and written where they enter the language model.

Every architecture's ``forward`` merges its (projected, packed) vision tokens into ``inputs_embeds``
at the image placeholder positions and hands them to its language model. A forward pre-hook on that
module (``Architecture.language_model``) is the one seam DiSP needs: ``capture`` reads the rows
there (and stops the forward before the language model runs), ``injected`` writes given rows there
in every call whose embeddings cover the batch's positions (a generation's prefill, every step of
the masked-diffusion sampler, a saliency forward), so gradients reach them and the model's own
positions, masks and caches stay as they are.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass
class VisionTokens:
    """Every vision token of a batch, row after row in prompt order (an anyres image's crops and
    newline tokens included), and how many belong to each image (each row holds at most one)."""

    features: torch.Tensor  # (N, hidden)
    counts: list[int]  # tokens of each image, in row order; sum(counts) == N

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-token ``values`` (N, ...) cut into one tensor per image."""
        return values.split(self.counts)

    def with_features(self, features: torch.Tensor) -> "VisionTokens":
        return VisionTokens(features, self.counts)


class _Captured(Exception):
    """Raised by the capture hook once it has the vision tokens: the language model never runs."""


def image_positions(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """(B, L) bool: where the image placeholders sit."""
    return input_ids == image_token_id


def capture(language_model: torch.nn.Module, positions: torch.Tensor, call) -> VisionTokens:
    """Run ``call()`` (a model forward) up to its language model and return the vision tokens it built."""
    got: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is not None and embeds.shape[:2] == positions.shape:
            got["features"] = embeds[positions.to(embeds.device)]
            raise _Captured

    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    except _Captured:
        pass
    finally:
        handle.remove()
    if "features" not in got:
        raise RuntimeError(f"{type(language_model).__name__} was not called with the batch's inputs_embeds;"
                           " the architecture adapter names the wrong language model")
    counts = positions.sum(1)
    return VisionTokens(got["features"], [int(c) for c in counts if c > 0])


@contextmanager
def injected(language_model: torch.nn.Module, positions: torch.Tensor, features: torch.Tensor) -> Iterator[None]:
    """Within the block, every call of ``language_model`` whose embeddings span ``positions`` (B, L)
    gets ``features`` (N, hidden) at those positions instead of what the model built."""

    def hook(module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or embeds.shape[:2] != positions.shape:
            return None  # a cached decoding step: the vision tokens are in the cache already
        where = positions.to(embeds.device).unsqueeze(-1)
        kwargs["inputs_embeds"] = embeds.masked_scatter(where, features.to(embeds.device, embeds.dtype))
        return args, kwargs

    handle = language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def without(inputs: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in keys}
