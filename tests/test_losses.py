"""DistillLoss plug-ins against a naive fp64 loop, a hand-computed case, gradcheck, chunking and masking."""

from __future__ import annotations

import math

import pytest
import torch

from pd_lightning.distill.losses import JSD, KLD, MSE, NLL, TVD, DistillLoss, ReverseKL
from pd_lightning.distill.target import SparseTarget
from pd_lightning.distill.temperature import NormKD, StaticTemperature

LOSSES = [NLL, KLD, MSE, lambda **kw: MSE(log_space=True, **kw), ReverseKL, JSD, lambda **kw: JSD(beta=0.2, **kw), TVD]
LOSS_IDS = ["NLL", "KLD", "MSE", "MSE-log", "ReverseKL", "JSD", "JSD-0.2", "TVD"]


def make_target(n: int, vocab: int, k: int, seed: int = 0, dtype=torch.float64) -> SparseTarget:
    """Top-k of a random teacher; every third row keeps only 2 entries (the rest is padding)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 2
    logp = z.log_softmax(-1)
    top = logp.topk(k, dim=-1)
    ids, lp = top.indices.clone(), top.values.clone()
    ids[::3, 2:], lp[::3, 2:] = 0, float("-inf")
    entropy = -(logp.exp() * logp).sum(-1)
    return SparseTarget(ids=ids, logprobs=lp.to(dtype), std=z.std(-1).to(dtype), entropy=entropy.to(dtype))


def naive(name: str, logits, target, mask, tau=1.0, tail=False, hinton=False) -> float:
    """Plain-Python fp64 reference: explicit softmaxes and per-entry formulas, one position at a time."""
    total, count = 0.0, 0
    for i in range(logits.shape[0]):
        entries = [(int(t), float(v)) for t, v in zip(target.ids[i], target.logprobs[i]) if math.isfinite(float(v))]
        if not bool(mask[i]) or not entries:
            continue
        tau_s = tau if hinton else 1.0
        z = [float(v) / tau_s for v in logits[i]]
        zmax = max(z)
        norm = sum(math.exp(v - zmax) for v in z)
        q = [math.exp(z[j] - zmax) / norm for j, _ in entries]
        w = [math.exp(lp / tau) for _, lp in entries]
        f = [x / sum(w) for x in w]
        if tail:
            kept = sum(math.exp(lp) for _, lp in entries)
            f = [x * kept for x in f] + [1.0 - kept]
            q = q + [1.0 - sum(q)]
        if name == "NLL":
            d = -sum(a * math.log(b) for a, b in zip(f, q))
        elif name == "KLD":
            d = sum(a * math.log(a / b) for a, b in zip(f, q))
        elif name == "MSE":
            d = sum((a - b) ** 2 for a, b in zip(f, q))
        elif name == "MSE-log":
            d = sum((math.log(a) - math.log(b)) ** 2 for a, b in zip(f, q))
        elif name == "ReverseKL":
            d = sum(b * math.log(b / a) - b + a for a, b in zip(f, q))
        elif name.startswith("JSD"):
            beta = 0.2 if name == "JSD-0.2" else 0.5
            m = [beta * a + (1 - beta) * b for a, b in zip(f, q)]
            d = sum(beta * a * math.log(a / c) + (1 - beta) * b * math.log(b / c) for a, b, c in zip(f, q, m))
        else:
            d = 0.5 * sum(abs(a - b) for a, b in zip(f, q))
        total += d * (tau**2 if hinton else 1.0)
        count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("make,name", list(zip(LOSSES, LOSS_IDS)), ids=LOSS_IDS)
def test_against_naive_fp64(make, name, tail):
    target = make_target(7, 11, 4)
    logits = torch.randn(7, 11, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    mask = torch.tensor([True, True, False, True, True, True, True])
    for tau, hinton in [(1.0, False), (2.0, False), (0.5, True)]:
        got = make(tail_bucket=tail, hinton=hinton)(logits, target, mask, StaticTemperature(tau))
        want = naive(name, logits, target, mask, tau, tail, hinton)
        assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12), (tau, hinton)


# Hand-computed case. Student logits (ln 2, 0, 0) -> q = (1/2, 1/4, 1/4). Teacher keeps ids 0 and 1 with
# p = (0.6, 0.2) (tail 0.2); at tau 1, F = (0.6, 0.2) / 0.8 = (3/4, 1/4).
#   NLL  = -(3/4 ln 1/2 + 1/4 ln 1/4) = (3/4 + 2/4) ln 2 = 1.25 ln 2                      = 0.866434
#   KLD  = 3/4 ln((3/4)/(1/2)) + 1/4 ln((1/4)/(1/4)) = 0.75 ln 1.5                        = 0.304099
#   MSE  = (3/4 - 1/2)^2 + 0 = 1/16                                                         = 0.0625
#   MSE-log = (ln 1.5)^2                                                                    = 0.164402
#   ReverseKL = 1/2 ln((1/2)/(3/4)) - 1/2 + 3/4 + 0 = -0.5 ln 1.5 + 0.25                  = 0.047267
#   JSD(0.5): M = (5/8, 1/4); 0.5 * 3/4 ln(6/5) + 0.5 * 1/2 ln(4/5) = 0.375 ln 1.2 + 0.25 ln 0.8 = 0.012585
#   TVD  = 1/2 (1/4 + 0)                                                                    = 0.125
#   KLD, tail bucket: F = (0.6, 0.2, 0.2) vs q = (1/2, 1/4, 1/4):
#        0.6 ln 1.2 + 0.2 ln 0.8 + 0.2 ln 0.8 = 0.6 ln 1.2 + 0.4 ln 0.8                   = 0.020136
#   KLD, tau 2 (teacher only): F = sqrt(p) renormalised = (sqrt 3, 1) / (sqrt 3 + 1) = ((3 - sqrt 3)/2, (sqrt 3 - 1)/2)
#        = (0.633975, 0.366025); 0.633975 ln(0.633975 / 0.5) + 0.366025 ln(0.366025 / 0.25) = 0.290050
#   KLD, Hinton tau 2: q(tau 2) = (sqrt 2, 1, 1) / (sqrt 2 + 2) -> (0.414214, 0.292893) at the kept ids;
#        4 * [0.633975 ln(0.633975 / 0.414214) + 0.366025 ln(0.366025 / 0.292893)]         = 1.405688
HAND = [
    (NLL(), 1.0, 0.866434),
    (KLD(), 1.0, 0.304099),
    (MSE(), 1.0, 0.0625),
    (MSE(log_space=True), 1.0, 0.164402),
    (ReverseKL(), 1.0, 0.047267),
    (JSD(), 1.0, 0.012585),
    (TVD(), 1.0, 0.125),
    (KLD(tail_bucket=True), 1.0, 0.020136),
    (KLD(), 2.0, 0.290050),
    (KLD(hinton=True), 2.0, 1.405688),
]


@pytest.mark.parametrize("loss,tau,want", HAND)
def test_hand_computed(loss, tau, want):
    # Row 2 is masked out and row 3 has no kept entries: neither may change the mean.
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0], [5.0, -1.0, 0.0], [1.0, 2.0, 3.0]])
    inf = float("-inf")
    target = SparseTarget(
        ids=torch.tensor([[0, 1], [2, 0], [0, 0]]),
        logprobs=torch.tensor([[math.log(0.6), math.log(0.2)], [-0.1, -3.0], [inf, inf]]),
    )
    mask = torch.tensor([True, False, True])
    got = loss(logits, target, mask, StaticTemperature(tau))
    assert got.item() == pytest.approx(want, abs=2e-6)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("make", LOSSES, ids=LOSS_IDS)
def test_gradcheck(make, tail):
    target = make_target(4, 6, 3, seed=2)
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64, requires_grad=True)
    loss = make(tail_bucket=tail)
    assert torch.autograd.gradcheck(lambda z: loss(z, target, None, StaticTemperature(1.5)), (logits,))


def test_gradcheck_student_temperature():
    """NormKD's student temperature depends on the logits; gradients flow through it (as in the authors' code)."""
    target = make_target(4, 6, 3, seed=4)
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: KLD()(z, target, None, NormKD(t_norm=1.3)), (logits,))


@pytest.mark.parametrize("make", LOSSES, ids=LOSS_IDS)
def test_chunked_equals_unchunked(make):
    target = make_target(10, 13, 5, seed=6, dtype=torch.float32)
    mask = torch.rand(10, generator=torch.Generator().manual_seed(7)) > 0.3
    loss = make(tail_bucket=True)
    results = []
    for chunk in (0, 3, 10, 64):
        logits = torch.randn(10, 13, generator=torch.Generator().manual_seed(8), requires_grad=True)
        value = loss(logits, target, mask, StaticTemperature(2.0), chunk_size=chunk)
        value.backward()
        results.append((value.detach(), logits.grad))
    for value, grad in results[1:]:
        torch.testing.assert_close(value, results[0][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", LOSSES, ids=LOSS_IDS)
def test_all_masked_is_finite_zero_with_grad(make):
    target = make_target(5, 9, 4)
    logits = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    value = make(tail_bucket=True)(logits, target, torch.zeros(5, dtype=torch.bool), NormKD())
    assert value.item() == 0.0 and value.grad_fn is not None
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_masked_rows_with_garbage_statistics_keep_gradients_finite():
    """Padding positions may carry a zero std; they must not put NaN into the gradients of counted rows."""
    target = make_target(4, 8, 3)
    target.std[1] = 0.0
    target.logprobs[1] = float("nan")
    logits = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    KLD()(logits, target, torch.tensor([True, False, True, True]), NormKD()).backward()
    assert torch.isfinite(logits.grad).all()


def test_tail_bucket_student_equal_to_teacher_gives_zero():
    """With the tail bucket every divergence is 0 when the student is the teacher (both sides proper)."""
    z = torch.randn(6, 20, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    top = z.log_softmax(-1).topk(5, dim=-1)
    target = SparseTarget(ids=top.indices, logprobs=top.values)
    for make in (KLD, ReverseKL, JSD, TVD, MSE):
        assert make(tail_bucket=True)(z, target).item() == pytest.approx(0.0, abs=1e-12)
    # Without it the renormalised kept set differs from the student's mass on it, so KLD > 0.
    assert KLD()(z, target).item() > 1e-3


def test_tail_bucket_is_below_full_kl():
    """Merging the tail into one outcome can only lose information: KL_bucket <= KL over the full vocabulary."""
    g = torch.Generator().manual_seed(10)
    zt, zs = torch.randn(8, 30, generator=g, dtype=torch.float64), torch.randn(8, 30, generator=g, dtype=torch.float64)
    pt, ls = zt.log_softmax(-1), zs.log_softmax(-1)
    top = pt.topk(6, dim=-1)
    full = (pt.exp() * (pt - ls)).sum(-1).mean()
    bucket = KLD(tail_bucket=True)(zs, SparseTarget(ids=top.indices, logprobs=top.values))
    assert 0.0 < bucket.item() < full.item()


def test_tail_bucket_dropped_when_teacher_keeps_everything():
    z = torch.randn(3, 5, dtype=torch.float64)
    lp = torch.randn(3, 5, dtype=torch.float64).log_softmax(-1)
    target = SparseTarget(ids=torch.arange(5).expand(3, 5), logprobs=lp)
    for make in (KLD, ReverseKL, TVD):
        torch.testing.assert_close(make(tail_bucket=True)(z, target), make()(z, target))


def test_hinton_scales_by_tau_squared_and_rejects_student_temperature():
    target = make_target(5, 9, 4)
    logits = torch.randn(5, 9, dtype=torch.float64)
    plain = KLD()(logits / 3.0, target, None, StaticTemperature(3.0))  # tau on both sides by hand
    hinton = KLD(hinton=True)(logits, target, None, StaticTemperature(3.0))
    torch.testing.assert_close(hinton, 9.0 * plain)
    with pytest.raises(ValueError, match="hinton.*NormKD"):
        KLD(hinton=True)(logits, target, None, NormKD())


def test_low_precision_input_is_upcast():
    target = make_target(6, 10, 4, dtype=torch.float32)
    logits = torch.randn(6, 10)
    want = KLD()(logits.bfloat16().float(), target)
    got = KLD()(logits.bfloat16(), target)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def test_bad_inputs_name_the_parameter():
    target = make_target(3, 6, 2)
    with pytest.raises(ValueError, match="chunk_size.*-1"):
        KLD()(torch.randn(3, 6, dtype=torch.float64), target, chunk_size=-1)
    with pytest.raises(ValueError, match="beta.*1.0"):
        JSD(beta=1.0)
    with pytest.raises(ValueError, match="logits"):
        KLD()(torch.randn(4, 6), target)
    with pytest.raises(ValueError, match="mask"):
        KLD()(torch.randn(3, 6, dtype=torch.float64), target, torch.ones(4, dtype=torch.bool))
    assert issubclass(KLD, DistillLoss)
