"""Worker for tests/test_eval_fsdp1.py: ``torchrun --nproc_per_node 2 fsdp1_eval.py OUT TOKENIZER DATA_DIR``.

Wraps a ``DistillationModule`` as Lightning's ``FSDPStrategy`` does (one root ``FullyShardedDataParallel`` around the
whole LightningModule, ``use_orig_params=True``; on CPU ``device_id=torch.device("cpu")``: torch 2.13 refuses
``None`` without an accelerator), with no inner unit ("root") and with one unit per ``Block`` as
``configs/trainer/fsdp.yaml`` asks ("blocks"), then calls ``score_module`` with a trainer-like object whose
``strategy.model`` is the root, as Lightning's trainer has. Writes ``OUT.<wrap>.<rank>.json``: the scores, every
answer ``ShardedLM`` returned (all requests, in order) and this rank's number of student forwards."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

# Two multiple-choice tasks and one generation task. piqa + c3 at limit 2 make 11 log-likelihood requests: with batch
# 1, rank 0 runs 6 forwards for them and rank 1 5 (its padded copy merges with its last request), so the ranks do not
# run the same forwards: scoring must need no collective per forward.
TASKS = ["piqa", "c3", "gsm8k"]
LIMIT, MAX_GEN_TOKS = 2, 8


def build_module():
    """The same tiny DistillationModule in every process (and in the one-process reference)."""
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.module import DistillationModule

    torch.manual_seed(0)
    return DistillationModule(StudentConfig(preset="tiny", vocab_size=512))


def score(trainer, module, tokenizer: str, data_dir: str) -> dict:
    """``score_module`` on the fixture tasks, with every answer ``ShardedLM`` hands back to lm-eval recorded."""
    from pd_lightning.eval.distributed import ShardedLM
    from pd_lightning.eval.scoring import score_module

    answers: dict[str, list] = {"loglikelihood": [], "generate_until": []}
    originals = {name: getattr(ShardedLM, name) for name in answers}

    def recording(name):
        def method(self, requests, **kwargs):
            out = originals[name](self, requests, **kwargs)
            answers[name].extend(list(a) if isinstance(a, tuple) else a for a in out)
            return out

        return method

    for name in answers:
        setattr(ShardedLM, name, recording(name))
    forwards = [0]
    handle = module.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        result = score_module(
            trainer, module, tokenizer, TASKS, data_dir, limit=LIMIT, max_gen_toks=MAX_GEN_TOKS, batch_size=1
        )
    finally:
        handle.remove()
        for name, original in originals.items():
            setattr(ShardedLM, name, original)
    return {"scores": result["scores"], "average": result["average"], "forwards": forwards[0], **answers}


def main(out: str, tokenizer: str, data_dir: str) -> None:
    from _exit import finish  # tests/workers/_exit.py: why a worker ends with os._exit
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from pd_lightning.model.transformer import Block

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    for wrap, policy in (("root", None), ("blocks", ModuleWrapPolicy({Block}))):
        module = build_module()
        root = FullyShardedDataParallel(
            module, use_orig_params=True, device_id=torch.device("cpu"), auto_wrap_policy=policy
        )
        module.train()
        trainer = SimpleNamespace(strategy=SimpleNamespace(model=root), is_global_zero=dist.get_rank() == 0)
        record = score(trainer, module, tokenizer, data_dir)
        # Afterwards: the parameters are sharded again, the training mode is back, and a training forward/backward
        # through the root still runs.
        record["sharded_after"] = all(p.dim() <= 1 for p in module.model.parameters())
        record["training_after"] = module.training and module.model.training
        loss = root(torch.randint(0, 512, (2, 16))).float().logsumexp(-1).mean()
        loss.backward()
        with open(f"{out}.{wrap}.{dist.get_rank()}.json", "w") as f:
            json.dump(record, f)
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:4])
