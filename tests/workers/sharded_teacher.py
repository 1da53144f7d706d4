"""Worker for ``tests/test_in_step_fsdp.py`` (run under ``torch.distributed.run``, 2 ranks, gloo): an in-step teacher
sharded with ``FrozenTeacher.shard`` gives each rank the targets the whole teacher gives on that rank's batch, and
after each ``targets`` call every FSDP2 unit of it, the root included, is back to its shards.
Writes ``{rank: {"max_abs_diff", "same_ids", "sharded_after", "fsdp_params"}}`` to ``argv[2]`` (rank 0 gathers;
``fsdp_params``: how many parameters FSDP2 manages)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from _exit import finish  # tests/workers/_exit.py: why a worker ends with os._exit
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

from pd_lightning.distill.processors import TopPK
from pd_lightning.online.in_step import FrozenTeacher


def sharded_states(model: torch.nn.Module) -> list[bool]:
    out = []
    for m in model.modules():
        group = m._get_fsdp_state()._fsdp_param_group if hasattr(m, "_get_fsdp_state") else None
        out += [] if group is None else [p.sharded_state == ShardedState.SHARDED for p in group.fsdp_params]
    return out


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    sharded, whole = FrozenTeacher(sys.argv[1]), FrozenTeacher(sys.argv[1])
    sharded.shard(mesh)
    torch.manual_seed(rank)  # each rank its own batch, as in training
    processor, result = TopPK(0.95, 20), {"max_abs_diff": 0.0, "same_ids": True, "sharded_after": True}
    for _ in range(2):
        ids = torch.randint(0, sharded.vocab_size, (2, 16))
        batch = {"input_ids": ids, "labels": ids}
        got, ref = sharded.targets(batch, processor, (0.5,)), whole.targets(batch, processor, (0.5,))
        states = sharded_states(sharded.teacher.model)
        result["fsdp_params"] = len(states)
        result["sharded_after"] &= all(states)
        result["same_ids"] &= bool(torch.equal(got.ids, ref.ids))
        finite = torch.isfinite(ref.logprobs)
        assert torch.equal(finite, torch.isfinite(got.logprobs))
        diff = (got.logprobs[finite] - ref.logprobs[finite]).abs().max().item()
        result["max_abs_diff"] = max(result["max_abs_diff"], diff)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(dict(enumerate(gathered)), sys.argv[2])
    finish()


if __name__ == "__main__":
    main()
