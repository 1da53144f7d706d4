"""Temperature transforms against the original methods' formulas (written out here in fp64)."""

from __future__ import annotations

import math

import pytest
import torch

from pd_lightning.distill.losses import KLD
from pd_lightning.distill.target import SparseTarget
from pd_lightning.distill.temperature import WTTM, AdaKD_H, AdaKD_SD, NormKD, StaticTemperature, TargetTransform

F64 = torch.float64


def full_target(zt: torch.Tensor) -> SparseTarget:
    """The teacher's whole distribution as a 'sparse' target (K = V), with its statistics."""
    logp = zt.log_softmax(-1)
    n, v = zt.shape
    return SparseTarget(
        ids=torch.arange(v).expand(n, v), logprobs=logp, std=zt.std(-1), entropy=-(logp.exp() * logp).sum(-1)
    )


def logits_pair(n=6, v=15, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=F64) * 3, torch.randn(n, v, generator=g, dtype=F64) * 2


def test_static_temperature_values_and_validation():
    z = torch.randn(4, 7)
    temps = StaticTemperature(0.5)(z, full_target(z))
    assert torch.equal(temps.teacher, torch.full((4,), 0.5)) and temps.student is None and temps.weight is None
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"tau must be > 0, got {bad}"):
            StaticTemperature(bad)


def test_normkd_matches_the_authors_formula():
    zt, zs = logits_pair()
    t_norm = 1.7
    # Authors' normkd_loss: T = T_norm * std per model; T_t^2 * KL(softmax(zt/T_t) || softmax(zs/T_s)), mean over rows.
    tt, ts = t_norm * zt.std(-1, keepdim=True), t_norm * zs.std(-1, keepdim=True)
    pt, ls = torch.softmax(zt / tt, -1), torch.log_softmax(zs / ts, -1)
    want = ((pt * (pt.log() - ls)).sum(-1) * tt.squeeze(-1) ** 2).mean()
    got = KLD()(zs, full_target(zt), None, NormKD(t_norm=t_norm))
    torch.testing.assert_close(got, want)


def test_normkd_needs_teacher_std():
    z = torch.randn(3, 5)
    target = SparseTarget(ids=torch.zeros(3, 1, dtype=torch.long), logprobs=torch.zeros(3, 1))
    with pytest.raises(ValueError, match="NormKD needs .*std"):
        NormKD()(z, target)
    with pytest.raises(ValueError, match="t_norm"):
        NormKD(t_norm=0.0)


@pytest.mark.parametrize("gamma", [0.3, 1.0, 2.0])
def test_wttm_matches_the_authors_formula(gamma):
    zt, zs = logits_pair(seed=1)
    # Authors' wttm.py: p_t^l / sum p_t^l, U = sum p_t^l, loss = mean(U * KL(p_t^l || softmax(y_s))).
    pt = torch.softmax(zt, -1) ** gamma
    u = pt.sum(-1)
    pt = pt / u[:, None]
    want = (u * (pt * (pt.log() - zs.log_softmax(-1))).sum(-1)).mean()
    got = KLD()(zs, full_target(zt), None, WTTM(gamma=gamma))
    torch.testing.assert_close(got, want)


def test_wttm_tail_approximations():
    """Kept (0.5, 0.3, 0.1); the tail 0.1 is flat over 5 of the 17 unkept ids (the others have p = 0)."""
    v, gamma = 20, 0.5
    p = torch.zeros(v, dtype=F64)
    p[:3] = torch.tensor([0.5, 0.3, 0.1], dtype=F64)
    p[3:8] = 0.02
    nz = p[p > 0]
    target = SparseTarget(
        ids=torch.tensor([[0, 1, 2]]),
        logprobs=p[:3].log()[None],
        entropy=-(nz * nz.log()).sum()[None],
    )
    kept = 0.5**gamma + 0.3**gamma + 0.1**gamma
    z = torch.zeros(1, v, dtype=F64)
    exact = WTTM(gamma, tail="entropy").weight(target, v)
    assert exact.item() == pytest.approx(kept + 5 * 0.02**gamma, rel=1e-9)  # flat tail -> exact
    assert exact.item() == pytest.approx((p**gamma).sum().item(), rel=1e-9)
    assert WTTM(gamma, tail="uniform").weight(target, v).item() == pytest.approx(kept + 17 ** (1 - gamma) * 0.1**gamma)
    assert WTTM(gamma, tail="bucket").weight(target, v).item() == pytest.approx(kept + 0.1**gamma)
    temps = WTTM(gamma, tail="bucket")(z, SparseTarget(ids=target.ids, logprobs=target.logprobs))  # no entropy needed
    assert temps.teacher.item() == pytest.approx(1 / gamma) and temps.student is None
    with pytest.raises(ValueError, match="WTTM needs .*entropy"):
        WTTM(gamma)(z, SparseTarget(ids=target.ids, logprobs=target.logprobs))
    with pytest.raises(ValueError, match="tail"):
        WTTM(gamma, tail="gauss")
    with pytest.raises(ValueError, match="gamma"):
        WTTM(gamma=-1.0)


@pytest.mark.parametrize("cls,stat", [(AdaKD_SD, "std"), (AdaKD_H, "entropy")])
def test_adakd_reconstruction(cls, stat):
    zt, zs = logits_pair(n=9, seed=2)
    target = full_target(zt)
    x = getattr(target, stat)
    counted = torch.ones(9, dtype=torch.bool)
    k = 0.7
    # Ganguly et al.: d = exp(-k (x - mean x)), w = exp(-1 / sqrt(d)), clamped to [0.1, 0.9].
    w_want = torch.exp(-1.0 / torch.exp(-k * (x - x.mean())).sqrt()).clamp(0.1, 0.9)
    t = cls(mode="weight", k=k, tau=1.5)
    temps = t(zs, target, t.batch_context(target, counted))
    torch.testing.assert_close(temps.weight, w_want)
    assert torch.all(temps.teacher == 1.5) and temps.student is None
    # Larger statistic -> smaller weight for k > 0.
    order = x.argsort()
    assert torch.all(temps.weight[order].diff() <= 0)
    t = cls(mode="temperature", k=k, tau_min=0.5, tau_max=2.0)
    temps = t(zs, target, t.batch_context(target, counted))
    torch.testing.assert_close(temps.teacher, 0.5 + 1.5 * (w_want - 0.1) / 0.8)
    assert temps.weight is None


def test_adakd_chunked_equals_unchunked():
    """The batch mean is computed once (batch_context), so chunking does not change the loss."""
    zt, zs = logits_pair(n=12, seed=3)
    target = full_target(zt)
    for transform in (AdaKD_SD(), AdaKD_H(mode="temperature")):
        whole = KLD()(zs, target, None, transform)
        chunked = KLD()(zs, target, None, transform, chunk_size=5)
        torch.testing.assert_close(chunked, whole)


def test_adakd_validation():
    with pytest.raises(ValueError, match="mode"):
        AdaKD_SD(mode="both")
    with pytest.raises(ValueError, match="w_min"):
        AdaKD_H(w_min=0.9, w_max=0.1)
    with pytest.raises(ValueError, match="tau must be > 0, got 0.0"):
        AdaKD_SD(tau=0.0)
    with pytest.raises(ValueError, match="tau_max"):
        AdaKD_SD(tau_min=2.0, tau_max=1.0)
    with pytest.raises(ValueError, match="AdaKD_H needs .*entropy"):
        AdaKD_H()(torch.zeros(2, 3), SparseTarget(ids=torch.zeros(2, 1, dtype=torch.long), logprobs=torch.zeros(2, 1)))


def test_every_transform_is_a_target_transform():
    for t in (StaticTemperature(), NormKD(), WTTM(), AdaKD_SD(), AdaKD_H()):
        assert isinstance(t, TargetTransform)
    assert math.isclose(WTTM(gamma=0.25)(torch.zeros(1, 4), full_target(torch.zeros(1, 4))).teacher.item(), 4.0)
