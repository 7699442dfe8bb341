"""The order in which a rank sees the training samples: reproducible, and resumable mid-epoch."""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from defend.config import Config, TrainConfig
from defend.engine.distributed import rank, world_size
from defend.seeds import derive_seed


class ResumableSampler(Sampler[int]):
    """Indices of one rank's samples, epoch after epoch without end, starting anywhere.

    Epoch ``e`` is one permutation of all ``n`` samples seeded by ``(seed, e)``, the same on every
    rank; rank ``r`` of ``w`` takes positions ``r, r+w, ...`` (the tail that does not divide by ``w``
    is dropped, as DistributedSampler does). ``start`` skips that many of this rank's samples, so a
    resumed run reads exactly what the interrupted one would have read next, without loading the
    skipped samples.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if n < world_size:
            raise ValueError(f"{n} samples cannot be split across {world_size} ranks")
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start
        self.per_rank = n // world_size

    def epoch_indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        order = torch.randperm(self.n, generator=generator)[: self.per_rank * self.world_size]
        return order[self.rank:: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.epoch_indices(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # one epoch of this rank
        return self.per_rank


def samples_per_step(train: TrainConfig) -> int:
    """Samples one rank reads per optimizer step."""
    return train.micro_batch_size * train.grad_accum


def resumable_loader(samples: list, collate, cfg: Config, start_step: int = 0) -> DataLoader:
    """Endless micro-batches of this rank's samples, from optimizer step ``start_step`` on."""
    sampler = ResumableSampler(len(samples), cfg.seed, rank(), world_size(),
                               start=start_step * samples_per_step(cfg.train))
    return DataLoader(samples, batch_size=cfg.train.micro_batch_size, sampler=sampler, collate_fn=collate,
                      generator=torch.Generator())  # never draws from the global RNG (exact resume)
