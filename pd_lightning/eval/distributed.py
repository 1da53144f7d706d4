"""Benchmark scoring across the ranks of a distributed run: each rank scores a share of the requests.

lm-eval's own distributed path hands each rank every ``world_size``-th document, but its few-shot sampler is one
``random.Random`` walked document by document, so a rank's prompts differ from a one-process run's. Here lm-eval
builds every prompt on every rank exactly as in one process (it sees ``world_size == 1``); only the model calls are
split: rank r takes requests r, r + W, r + 2W, ... (a strided share, so lengths are balanced), padded with copies of
its last request to ``ceil(N / W)`` so every rank runs the same number of requests (and batches: FSDP needs every
rank in every forward); the padded answers are dropped and the answers all-gathered back into request order. Every
rank then computes the same metrics, equal to a one-process run's up to the float rounding of different batch
compositions.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from lm_eval.api.model import LM


def _world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@contextlib.contextmanager
def single_process_view() -> Iterator[None]:
    """lm-eval returns results only where ``LOCAL_RANK`` is 0 (its tensor-parallel guard): every rank computes the
    same metrics here, so each one sees ``LOCAL_RANK=0`` for the duration of the evaluation."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LOCAL_RANK"]
        else:
            os.environ["LOCAL_RANK"] = saved


def shard(n: int, rank: int, world_size: int) -> tuple[list[int], int]:
    """Indices of rank's requests (strided) and the padded share length ``ceil(n / world_size)``."""
    return list(range(rank, n, world_size)), math.ceil(n / world_size)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are sharded across ranks (FSDP2 ``DTensor`` parameters, or FSDP1 wrappers)."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return True
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules())


def fsdp1_root(trainer, module: torch.nn.Module) -> torch.nn.Module | None:
    """The outermost FSDP1 ``FullyShardedDataParallel`` over ``module``'s parameters, or None when none is in use.

    Lightning's ``FSDPStrategy`` wraps the LightningModule itself (``trainer.strategy.model`` is the wrapper), so the
    root is not among ``module.modules()``: it is looked for at ``trainer.strategy.model``, then in ``module``."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = getattr(getattr(trainer, "strategy", None), "model", None)
    for candidate in (wrapped, module):
        if not isinstance(candidate, torch.nn.Module) or not any(m is module for m in candidate.modules()):
            continue
        for m in candidate.modules():  # modules() is pre-order: the first FSDP unit found is the outermost
            if isinstance(m, FullyShardedDataParallel):
                return m
    return None


@contextlib.contextmanager
def full_fsdp1_parameters(root: torch.nn.Module | None) -> Iterator[bool]:
    """Every FSDP1 unit under ``root`` holds its full, unsharded parameters for the duration (yields True), so the
    module's parameters are plain whole tensors and each rank can run the model on its own: no collective per
    forward, no lockstep. ``root`` None: nothing to do (yields False).

    ``summon_full_params(root, writeback=False, recurse=True)``: one all-gather per unit on entry; on exit every
    unit is resharded and the gathered copies are freed (``writeback=False``: scoring changes no weight, and nothing
    is copied back). Inner units (``configs/trainer/fsdp.yaml`` wraps each ``Block``) are called by the model's own
    forward; an FSDP1 unit's forward would reshard its parameters afterwards and all-gather them again at its next
    call (a collective that ranks running different numbers of forwards do not all join), so for the duration each
    unit's forward is its wrapped module's, which runs on the gathered parameters as they are: at their stored
    dtype (no FSDP mixed-precision cast; fp32 under Lightning's bf16-mixed, as a one-process scoring of the
    checkpoint).

    Memory: while it lasts each rank holds the whole model's parameters next to its shards, gradients and
    optimizer state -- what a single root unit gathers for every training forward anyway, but more than training's
    peak when the units are per block (there training holds about one block's parameters at a time). The
    alternative, forwards through the wrapped units with every rank in lockstep, keeps that per-unit peak but
    all-gathers every unit at every forward (each generated token included); the full copy is chosen for scoring,
    whose forwards are many and small. A model that fits on a device only when sharded cannot be scored live this
    way: score its checkpoint with ``pd-lightning validate`` on more memory, or train under FSDP2, which scores in
    lockstep with the parameters left sharded."""
    if root is None:
        yield False
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in root.modules() if isinstance(m, FullyShardedDataParallel)]
    with FullyShardedDataParallel.summon_full_params(root, writeback=False, recurse=True):
        for unit in units:  # an instance attribute: nn.Module.__call__ finds it before the class's forward
            unit.forward = unit._fsdp_wrapped_module.__call__
        try:
            yield True
        finally:
            for unit in units:
                del unit.forward


class ShardedLM(LM):
    """Wraps an lm-eval ``LM`` (e.g. ``StudentLM``) so that each rank of the default process group scores a share.

    Every rank must call the same methods with the same requests (they do: each runs the same lm-eval evaluation).

    Equal shares do not make equal numbers of forwards (the adapter merges requests with the same input, and
    generation stops when its rows are done), so with ``lockstep`` every forward of ``lm.model`` is preceded by a
    one-integer all-reduce of "still working", and a rank that has finished runs one-token dummy forwards until every
    rank has: each rank takes part in every forward, as FSDP's parameter all-gathers need. The wrapped LM must call
    the model's output head (its own FSDP2 unit when untied) exactly once after each forward, as a dummy forward does
    (``StudentLM`` does: after each scoring forward, each prefill of a shared prefix, each decoding step).
    ``lockstep=None`` turns it on when the model's parameters are sharded (``is_sharded``).
    """

    def __init__(self, lm: LM, group=None, lockstep: bool | None = None) -> None:
        super().__init__()
        self.lm, self.group = lm, group
        self.shard_rank, self.shard_world = _world(group)
        model = getattr(lm, "model", None)
        if lockstep is None:
            lockstep = self.shard_world > 1 and model is not None and is_sharded(model)
        self.lockstep = lockstep
        self.forwards = 0  # forwards of lm.model on this rank (real + dummy) during the last lockstep call

    def __getattr__(self, name: str) -> Any:  # tokenizer, batch_size, ... of the wrapped model
        if name == "lm":
            raise AttributeError(name)
        return getattr(self.lm, name)

    def _run(self, method: str, requests: list) -> list:
        call = getattr(self.lm, method)
        if self.shard_world == 1 or not requests:
            return call(requests)
        mine, per = shard(len(requests), self.shard_rank, self.shard_world)
        # A rank with no request of its own repeats request 0: it still has to take part in every forward.
        padding = [requests[mine[-1] if mine else 0]] * (per - len(mine))
        share = [requests[i] for i in mine] + padding
        answers = (self._lockstep(call, share) if self.lockstep else call(share))[: len(mine)]
        lengths = getattr(self.lm, "request_lengths", None)
        if padding and isinstance(lengths, list):  # the padded copies were not requests: not in the length record
            del lengths[len(lengths) - len(padding) :]
        gathered: list = [None] * self.shard_world
        dist.all_gather_object(gathered, answers, group=self.group)
        results: list = [None] * len(requests)
        for rank, rank_answers in enumerate(gathered):
            for i, answer in zip(range(rank, len(requests), self.shard_world), rank_answers):
                results[i] = answer
        return results

    def _lockstep(self, call, share: list) -> list:
        model = self.lm.model
        device = next(model.parameters()).device
        self.forwards = 0

        def still_working(flag: int) -> int:
            t = torch.tensor([flag], dtype=torch.int64, device=device)
            dist.all_reduce(t, group=self.group)
            return int(t.item())

        def before_forward(module, args) -> None:
            still_working(1)
            self.forwards += 1

        handle = model.register_forward_pre_hook(before_forward)
        try:
            answers = call(share)
        finally:
            handle.remove()
        dummy = torch.zeros(1, 1, dtype=torch.long, device=device)
        while still_working(0):  # others are still working: join their forward
            with torch.inference_mode():
                model(dummy)
            self.forwards += 1
        return answers

    def loglikelihood(self, requests, **kwargs) -> list:
        return self._run("loglikelihood", requests)

    def loglikelihood_rolling(self, requests, **kwargs) -> list:
        return self._run("loglikelihood_rolling", requests)

    def generate_until(self, requests, **kwargs) -> list:
        return self._run("generate_until", requests)
