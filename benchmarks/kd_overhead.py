"""Cost of the KD term in a full training step: (forward + backward + AdamW) with KD from top-0.95-100 sparse
targets ÷ the same step with the LM loss only. Same student, same batch, interleaved repetitions, median ratio.

    .venv/bin/python benchmarks/kd_overhead.py [--vocab 32000 --hidden 256 --layers 4 --tokens 2048 --reps 7]

The sparse targets are shaped like a real top-0.95-100 cache: K = 100 slots per position, a variable number of
them used (geometric-like, mean ~25, as METHOD.md's ~150 B/token figure implies), log-probabilities of a
Zipf-like teacher distribution. Both variants use the module's default (fused, chunked) loss path.
Last line: ``RESULT kd_step_ratio=... lm_step_ms=... kd_step_ms=...``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from pd_lightning.distill.losses import KLD
from pd_lightning.distill.schedules import Constant
from pd_lightning.distill.target import TEACHER_ENTROPY, TEACHER_IDS, TEACHER_LOGPROBS, TEACHER_STD
from pd_lightning.distill.temperature import StaticTemperature
from pd_lightning.model.config import StudentConfig
from pd_lightning.module import DistillationModule


def sparse_targets(n: int, vocab: int, k: int, mean_kept: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """(n, k) ids / log-probs of a Zipf-like distribution truncated to a variable number of entries."""
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    logits = -1.1 * ranks.log()  # Zipf exponent 1.1
    logp = (logits - torch.logsumexp(logits, 0)).float().expand(n, k).clone()  # (n, k)
    kept = torch.clamp(torch.distributions.Geometric(probs=1 / mean_kept).sample((n,)).long() + 1, max=k)  # (n,)
    pad = torch.arange(k)[None, :] >= kept[:, None]
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(min(n, 64))])  # (64, k) unique rows
    ids = ids.repeat(math.ceil(n / ids.shape[0]), 1)[:n]
    return {
        TEACHER_IDS: ids.masked_fill(pad, 0),
        TEACHER_LOGPROBS: logp.masked_fill(pad, -math.inf),
        TEACHER_STD: torch.full((n,), 2.0),
        TEACHER_ENTROPY: torch.full((n,), 3.0),
    }


def make_module(cfg: StudentConfig, kd: bool, fused: bool) -> tuple[DistillationModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = DistillationModule(
        cfg,
        fused_loss=fused,
        loss=KLD() if kd else None,
        temperature=StaticTemperature(1.0) if kd else None,
        alpha=Constant(0.9) if kd else None,
        max_steps=1000,
    )
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    return module, opt


def step(module: DistillationModule, opt: torch.optim.Optimizer, batch: dict, alpha: float) -> float:
    t0 = time.perf_counter()
    out = module._loss(batch, alpha)
    out.total.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--mean_kept", type=float, default=25.0)
    ap.add_argument("--fused", choices=["true", "false"], default="true", help="the module's fused_loss")
    args = ap.parse_args()

    cfg = StudentConfig(
        vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.hidden // 64,
        n_query_groups=max(1, args.hidden // 128), intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    B, T = args.batch, args.seq
    ids = torch.randint(0, args.vocab, (B, T + 1), generator=gen)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    targets = sparse_targets(B * T, args.vocab, 100, args.mean_kept, gen)
    kd_batch = {**batch, **{k: v.reshape(B, T, *v.shape[1:]) for k, v in targets.items()}}

    fused = args.fused == "true"
    lm, lm_opt = make_module(cfg, kd=False, fused=fused)
    kd, kd_opt = make_module(cfg, kd=True, fused=fused)
    for _ in range(2):  # warm-up (allocator, AdamW state)
        step(lm, lm_opt, batch, 0.0)
        step(kd, kd_opt, kd_batch, 0.9)
    lm_t, kd_t, ratios = [], [], []
    for r in range(args.reps):
        pair = [(lm, lm_opt, batch, 0.0), (kd, kd_opt, kd_batch, 0.9)]
        if r % 2:
            pair.reverse()  # interleave the order so drift in machine load hits both equally
        times = {id(m): step(m, o, b, a) for m, o, b, a in pair}
        lm_t.append(times[id(lm)])
        kd_t.append(times[id(kd)])
        ratios.append(times[id(kd)] / times[id(lm)])
    print(
        f"student: {cfg.num_parameters() / 1e6:.1f}M params, vocab {args.vocab}, {B}x{T} tokens per step, "
        f"fused loss: {fused}"
    )
    print(f"LM-only step   median {statistics.median(lm_t) * 1e3:8.1f} ms  (all: {[round(t * 1e3) for t in lm_t]})")
    print(f"LM+KD step     median {statistics.median(kd_t) * 1e3:8.1f} ms  (all: {[round(t * 1e3) for t in kd_t]})")
    print(f"paired ratios  {[round(x, 3) for x in ratios]}")
    print(
        f"RESULT kd_step_ratio={statistics.median(ratios):.4f} lm_step_ms={statistics.median(lm_t) * 1e3:.1f} "
        f"kd_step_ms={statistics.median(kd_t) * 1e3:.1f}"
    )


if __name__ == "__main__":
    main()
