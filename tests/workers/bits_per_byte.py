"""Worker of ``tests/test_crosstok_bytes.py::test_bits_per_byte_sums_over_ranks_before_dividing`` (under torchrun).

Rank ``r`` updates ``BitsPerByte`` with its own nats and bytes (rank 0: 10 nats over 1 byte; rank 1: 1 nat over 9
bytes), so the ratio of the totals (11 / ln 2 / 10) differs from the mean of the ranks' ratios; rank 0 writes what
``compute`` returned on each rank.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _exit import finish  # tests/workers/_exit.py: why a worker ends with os._exit

from pd_lightning.crosstok.bytes import BitsPerByte


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    metric = BitsPerByte()
    nats, num_bytes = [(6.0, 1), (1.0, 5)][rank]
    metric.update(torch.tensor(nats), torch.tensor(num_bytes))  # two batches on rank 0, one on rank 1
    if rank == 0:
        metric.update(torch.tensor(4.0), torch.tensor(0))
    else:
        metric.update(torch.tensor(0.0), torch.tensor(4))
    value = metric.compute().reshape(1)
    every = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(every, value)
    if rank == 0:
        torch.save(torch.cat(every), out)
    finish()


if __name__ == "__main__":
    main(sys.argv[1])
