"""The ULD loss (issue 20, item 2: the vocabulary-free path): against a naive fp64 formula and a hand-computed case,
invariant to the teacher's ids, gradients by gradcheck, and the fused chunked objective equal to the unfused one."""

from __future__ import annotations

import math

import pytest
import torch

from pd_lightning.distill.losses import ULD
from pd_lightning.distill.objective import lm_kd_loss
from pd_lightning.distill.target import SparseTarget
from pd_lightning.distill.temperature import StaticTemperature


def sparse_target(n: int, v: int, k: int, seed: int, dtype=torch.float64) -> SparseTarget:
    g = torch.Generator().manual_seed(seed)
    lp, ids = torch.log_softmax(torch.randn(n, v, generator=g, dtype=dtype) * 2, -1).topk(k)
    lp[::3, k - 2 :] = float("-inf")  # rows with fewer kept entries
    ids[::3, k - 2 :] = 0
    lp[4] = float("-inf")  # an empty row: not counted
    ids[4] = 0
    tail = (1 - lp.exp().sum(-1)).clamp(min=0)
    return SparseTarget(ids, lp, tail=tail)


def naive_uld(logits, target, tau: float = 1.0, tail_bucket: bool = False) -> float:
    """Plain Python, fp64: sort both probability vectors (the teacher's padded with zeros to the student's length)
    and sum |difference|; with the tail bucket, the teacher's ranks beyond its kept set are one bucket of its tail."""
    total, count = 0.0, 0
    for z, lps, tail in zip(logits.double().tolist(), target.logprobs.double().tolist(), target.tail.tolist()):
        kept = [x / tau for x in lps if math.isfinite(x)]
        if not kept:
            continue
        m = max(kept)
        f = [math.exp(x - m) for x in kept]
        f = [x / sum(f) for x in f]
        zm = max(z)
        q = [math.exp(x - zm) for x in z]
        q = sorted((x / sum(q) for x in q), reverse=True)
        if tail_bucket:
            f = sorted(((1 - tail) * x for x in f), reverse=True)
            k = len(f)
            total += sum(abs(a - b) for a, b in zip(q[:k], f)) + abs(tail - sum(q[k:]))
        else:
            f = sorted(f, reverse=True) + [0.0] * (len(q) - len(f))
            total += sum(abs(a - b) for a, b in zip(q, f))
        count += 1
    return total / count


@pytest.mark.parametrize("tail_bucket", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_uld_equals_the_naive_formula(tail_bucket, tau):
    n, v, k = 12, 30, 6
    logits = torch.randn(n, v, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = sparse_target(n, 50, k, seed=6)  # a teacher vocabulary of 50 ids, larger than the student's 30
    loss = ULD(tail_bucket=tail_bucket)(logits, target, transform=StaticTemperature(tau))
    assert float(loss) == pytest.approx(naive_uld(logits, target, tau, tail_bucket), rel=1e-12)


def test_uld_hand_computed():
    """Student probabilities (0.2, 0.5, 0.3), teacher kept (0.7 on id 2, 0.3 on id 0): sorted (0.5, 0.3, 0.2) against
    (0.7, 0.3, 0): |0.5 - 0.7| + |0.3 - 0.3| + |0.2 - 0| = 0.4."""
    logits = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    target = SparseTarget(torch.tensor([[2, 0]]), torch.tensor([[0.7, 0.3]], dtype=torch.float64).log())
    assert float(ULD()(logits, target)) == pytest.approx(0.4, abs=1e-12)


def test_uld_ignores_the_teacher_ids():
    """Vocabulary-free: permuting which ids the teacher's probabilities sit on (even ids the student does not have,
    a teacher vocabulary larger than the student's) leaves the loss unchanged."""
    logits = torch.randn(10, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target = sparse_target(10, 20, 5, seed=2)
    other = SparseTarget(torch.randint(0, 10_000, target.ids.shape), target.logprobs, tail=target.tail)
    assert float(ULD()(logits, target)) == float(ULD()(logits, other))


@pytest.mark.parametrize("tail_bucket", [False, True])
def test_uld_gradcheck(tail_bucket):
    logits = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    target = sparse_target(6, 9, 4, seed=4)
    assert torch.autograd.gradcheck(lambda z: ULD(tail_bucket=tail_bucket)(z, target), (logits,))


def test_uld_in_the_fused_objective_equals_unfused():
    """lm_kd_loss with ULD: fused in chunks of 5 positions (the generic route: ULD reads the student's top-k) equals
    the unfused autograd path in the loss and in the gradients of hidden states and head."""
    g = torch.Generator().manual_seed(8)
    n, h, v, k = 23, 8, 40, 6
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[3] = -100
    target = sparse_target(n, v, k, seed=9)
    results = []
    for fused in (True, False):
        out = lm_kd_loss(hidden, weight, labels, target, 0.7, ULD(), chunk_size=5, fused=fused)
        gh, gw = torch.autograd.grad(out.total, (hidden, weight))
        results.append((out.total.detach(), out.kd, gh, gw))
    # fp64 inputs, but the fused path's per-token scales ((1 - alpha) / n_lm, alpha / n_kd) are fp32 tensors: its
    # gradients differ from the unfused ones by up to ~1e-8 relative for KLD too (measured: 3e-9 absolute).
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    assert float(results[0][1]) > 0


def test_uld_trains_from_a_cache_through_the_cli(tmp_path, hf_teacher, prepared):
    """``--model.loss ULD`` (the short name, as for the other losses) with the tail bucket: a fit from a teacher cache
    logs a finite, positive KD loss every step, and val/bpb (the cache's val_tokens file names the tokenizer)."""
    import csv

    from pd_lightning.cli import main
    from tests.test_predict import fit_from_cache, predict_args

    cache = tmp_path / "cache"
    main(predict_args(hf_teacher, prepared["tokens"], cache))
    args = fit_from_cache(cache, prepared["tokens"], tmp_path / "run", 3, "--trainer.val_check_interval", "3")
    args[args.index("pd_lightning.distill.losses.KLD")] = "ULD"
    main([*args, "--model.loss.tail_bucket", "true"])
    with open(tmp_path / "run" / "log" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    kd = [float(r["train/kd_loss"]) for r in rows if r.get("train/kd_loss")]
    assert len(kd) == 3 and all(0 < x < 2 for x in kd)  # an L1 distance between distributions lies in [0, 2]
    assert [r for r in rows if r.get("val/bpb")]
