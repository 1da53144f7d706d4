"""A resumable, rank-aware sampler: the data position is part of the checkpoint.

Epoch ``e`` visits ``permutation(seed + e)`` (or ``arange`` without shuffling); rank ``r`` of ``w`` takes every
``w``-th index from position ``r``, after trimming the order to a multiple of ``w`` so all ranks see the same
number of samples. After a restore it skips the samples the checkpointed run had already consumed in the
restored epoch, so a resumed run sees exactly the sequence an uninterrupted one would.

``len(sampler)`` is always the full epoch's length, also in a restored epoch whose iterator yields fewer samples:
Lightning restores the count of batches already done and measures the loader once per fit, so a shorter length
would end the restored epoch early and cap every later epoch at that length (issue 8: a resume in epoch 0 dropped
data). The restored epoch ends when the iterator runs out, at the same step as in the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, num_samples: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if num_samples < world_size:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")
        self.num_samples, self.shuffle, self.seed = num_samples, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip_epoch = -1  # epoch in which the first `_skip` samples were already consumed
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` samples (of this rank) of ``epoch``."""
        self._skip_epoch, self._skip = epoch, consumed

    def _order(self) -> torch.Tensor:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        per_rank = self.num_samples // self.world_size
        return order[: per_rank * self.world_size][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.epoch == self._skip_epoch:
            order = order[self._skip :]
        return iter(order.tolist())

    def __len__(self) -> int:
        """Samples per epoch and rank (the full epoch, whether or not a restore skips its start; module docstring)."""
        return self.num_samples // self.world_size
