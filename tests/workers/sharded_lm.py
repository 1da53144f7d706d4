"""Worker for tests/test_eval_callback.py: ``python -m torch.distributed.run --nproc_per_node 2 sharded_lm.py OUT TOK``.
Each rank scores its share of fixed requests through ``ShardedLM``, without and with lockstep, and writes
``OUT.<lockstep>.<rank>.json``."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist


def build(tokenizer: str):
    """The same tiny student, tokenizer and requests in every process (and in the one-process reference)."""
    from lm_eval.api.instance import Instance

    from pd_lightning.eval.lm import StudentLM
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(StudentConfig(preset="tiny", vocab_size=512))
    lm = StudentLM(model, tokenizer=tokenizer, batch_size=2, max_length=64, progress=False)
    words = "the quick brown fox jumps over a lazy dog while seven cats watch from the old wall".split()
    ll = [Instance("loglikelihood", {}, (" ".join(words[: 2 + i]), " " + words[(3 * i) % 17]), i) for i in range(7)]
    gen = [Instance("generate_until", {}, (" ".join(words[i : i + 4]), {"until": ["\n\n"], "max_gen_toks": 3 + 2 * i}),
                    i) for i in range(3)]  # fmt: skip
    one = [Instance("generate_until", {}, ("a lazy dog", {"until": ["\n\n"], "max_gen_toks": 4}), 0)]
    return lm, ll, gen, one


def main(out: str, tokenizer: str) -> None:
    from _exit import finish  # tests/workers/_exit.py: why a worker ends with os._exit (here: tests import build)

    from pd_lightning.eval.distributed import ShardedLM

    dist.init_process_group("gloo")
    lm, ll, gen, one = build(tokenizer)
    for lockstep in (0, 1):
        sharded = ShardedLM(lm, lockstep=bool(lockstep))
        result, forwards = {}, {}
        for name, method, requests in (("ll", "loglikelihood", ll), ("gen", "generate_until", gen),
                                       ("one", "generate_until", one)):  # fmt: skip
            result[name] = getattr(sharded, method)(requests)
            forwards[name] = sharded.forwards
        result["forwards"] = forwards
        with open(f"{out}.{lockstep}.{dist.get_rank()}.json", "w") as f:
            json.dump(result, f)
    finish()


if __name__ == "__main__":
    main(*sys.argv[1:3])
