"""Worker of ``tests/test_distributed.py::test_sharded_head_fused_loss_matches_one_process`` (run under torchrun).

Each rank holds a DTensor shard (``Shard(0)``, rows of the vocabulary) of the output head and half of the positions;
it computes ``lm_kd_loss`` (fused and unfused) through the sharded head and writes, on rank 0, the mean loss over
ranks, the full head gradient (gathered from the shards) and every rank's ``d hidden`` next to a 1-process reference
computed in fp64 on all positions with the full head.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _exit import finish  # tests/workers/_exit.py: why a worker ends with os._exit
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from pd_lightning.distill.losses import KLD
from pd_lightning.distill.objective import lm_kd_loss
from pd_lightning.distill.target import SparseTarget
from pd_lightning.distill.temperature import StaticTemperature


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = {path: compare(mesh, rank, world, path == "fused") for path in ("fused", "unfused")}
    if rank == 0:
        torch.save(results, out)
    finish()


def compare(mesh, rank: int, world: int, fused: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    n, h, v, k = 24, 16, 40, 5  # every position labelled and with a target: equal token counts on every rank
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    top = torch.randn(n, v, generator=g, dtype=torch.float64).mul(2).log_softmax(-1).topk(k)
    target = SparseTarget(ids=top.indices, logprobs=top.values)

    # 1-process reference: all positions, the full head, the same path (fused or not).
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = lm_kd_loss(h_ref, w_ref, labels, target, 0.4, KLD(), StaticTemperature(2.0), 5, fused)
    ref.total.backward()

    rows = slice(rank, n, world)
    w_shard = distribute_tensor(weight.clone(), mesh, [Shard(0)]).requires_grad_()
    h_rank = hidden[rows].clone().requires_grad_()
    t_rank = SparseTarget(ids=target.ids[rows], logprobs=target.logprobs[rows])
    out_rank = lm_kd_loss(h_rank, w_shard, labels[rows], t_rank, 0.4, KLD(), StaticTemperature(2.0), 5, fused)
    out_rank.total.backward()
    loss = out_rank.total.detach().clone()
    dist.all_reduce(loss)
    d_weight = w_shard.grad.full_tensor()
    d_hidden = [torch.empty_like(h_rank) for _ in range(world)]
    dist.all_gather(d_hidden, h_rank.grad)
    return {
        "loss": loss / world,
        "ref_loss": ref.total.detach(),
        "d_weight": d_weight,
        "ref_d_weight": w_ref.grad,
        "d_hidden": torch.stack(d_hidden),
        "ref_d_hidden": torch.stack([h_ref.grad[slice(r, n, world)] for r in range(world)]),
        "grad_is_sharded": type(w_shard.grad).__name__ == "DTensor",
        "world": world,
    }


if __name__ == "__main__":
    main(sys.argv[1])
