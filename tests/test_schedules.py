"""Alpha schedules at step 0, their phase edges and the last step; WSD edges shared with the WSD learning rate."""

from __future__ import annotations

import itertools
import math

import pytest

from pd_lightning.distill.lr import WSDLR, Cosine, phase_edges
from pd_lightning.distill.schedules import (
    WSD,
    AlphaScheduler,
    Constant,
    LinearDecrease,
    LinearIncrease,
    Periodic,
    WSDBeta,
)


def test_constant():
    assert Constant(0.9)(0, 10) == 0.9 and Constant(0.9)(9, 10) == 0.9
    assert Constant(0.0)(5, 10) == 0.0


def test_linear_endpoints_and_middle():
    inc, dec = LinearIncrease(), LinearDecrease()
    assert inc(0, 11) == 0.0 and inc(5, 11) == pytest.approx(0.5) and inc(10, 11) == 1.0
    assert dec(0, 11) == 1.0 and dec(5, 11) == pytest.approx(0.5) and dec(10, 11) == 0.0
    assert inc(50, 11) == 1.0  # past the end: the last value
    assert LinearIncrease(0.2, 0.6)(10, 11) == pytest.approx(0.6)
    assert inc(0, 1) == 0.0  # one-step run


@pytest.mark.parametrize("shape", ["cosine", "triangle", "square"])
def test_periodic(shape):
    s = Periodic(low=0.1, high=0.9, period_steps=10, shape=shape)
    assert s(0, 100) == pytest.approx(0.1)  # every period starts at low
    assert s(10, 100) == pytest.approx(0.1)
    assert s(5, 100) == pytest.approx(0.9)  # mid-period at high
    assert s(15, 100) == pytest.approx(0.9)
    if shape == "square":
        assert s(4, 100) == pytest.approx(0.1) and s(9, 100) == pytest.approx(0.9)
    if shape == "triangle":
        assert s(2, 100) == pytest.approx(0.1 + 0.8 * 0.4)
    # num_periods: 4 periods over 100 steps -> period 25.
    t = Periodic(low=0.0, high=1.0, num_periods=4, shape=shape)
    assert t(0, 100) == 0.0 and t(25, 100) == pytest.approx(0.0) and t(12.5, 100) == pytest.approx(1.0)


@pytest.mark.parametrize("total,warmup,decay", [(100, 0.1, 0.2), (1000, 0.01, 0.1), (37, 0.13, 0.29), (10, 0.0, 0.5)])
def test_wsd_phase_edges(total, warmup, decay):
    s = WSD(alpha_max=0.9, alpha_min=0.1, warmup_fraction=warmup, decay_fraction=decay)
    warmup_end, decay_start = phase_edges(total, warmup, decay)
    assert warmup_end == round(warmup * total) and decay_start == total - round(decay * total)
    if warmup_end > 0:
        assert s(0, total) == pytest.approx(0.1 + 0.8 / warmup_end)  # step 0: first warm-up increment
        assert s(warmup_end - 1, total) == pytest.approx(0.9)  # warm-up reaches the plateau on its last step
        if warmup_end > 1:
            assert s(warmup_end - 2, total) < 0.9
    else:
        assert s(0, total) == pytest.approx(0.9)
    assert s(warmup_end, total) == pytest.approx(0.9)
    assert s(decay_start - 1, total) == pytest.approx(0.9)  # the last plateau step
    d = total - decay_start
    assert s(decay_start, total) == pytest.approx(0.1 + 0.8 * (d - 1) / d)  # d decay steps, each below the plateau
    assert s(total - 1, total) == pytest.approx(0.1)  # last step: alpha_min


@pytest.mark.parametrize(
    "total,warmup,decay", list(itertools.product([1, 7, 50, 333], [0.0, 0.05, 0.3], [0.0, 0.1, 0.5]))
)
def test_wsd_alpha_follows_wsd_lr(total, warmup, decay):
    """With linked fractions, WSD-alpha is WSD-LR's shape at every step (same edges, same ramps)."""
    lr = WSDLR(warmup_fraction=warmup, decay_fraction=decay, min_lr_ratio=0.0)
    alpha = WSD(alpha_max=1.0, alpha_min=0.0, warmup_fraction=warmup, decay_fraction=decay)
    beta = WSDBeta(warmup_fraction=warmup, decay_fraction=decay)
    for step in range(total):
        assert alpha(step, total) == pytest.approx(lr(step, total), abs=1e-12)
        assert beta(step, total) == pytest.approx(1.0 - lr(step, total), abs=1e-12)


def test_wsd_beta_endpoints():
    s = WSDBeta(beta_max=0.8, beta_min=0.2, warmup_fraction=0.1, decay_fraction=0.1)
    assert s(50, 100) == pytest.approx(0.2)  # plateau: beta = 0.8 -> alpha = 0.2
    assert s(99, 100) == pytest.approx(0.8)  # last step: beta = 0.2
    assert s(0, 100) == pytest.approx(1 - (0.2 + 0.6 / 10))


@pytest.mark.parametrize(
    "schedule",
    [
        Constant(0.3),
        LinearIncrease(),
        LinearDecrease(0.9, 0.1),
        Periodic(0.2, 0.7, period_steps=7),
        WSD(0.9, 0.0, 0.2, 0.3),
        WSDBeta(),
    ],
)
def test_values_stay_in_unit_interval_and_are_pure(schedule):
    assert isinstance(schedule, AlphaScheduler)
    values = [schedule(step, 97) for step in range(120)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert values == [schedule(step, 97) for step in range(120)]  # no hidden state: same again
    assert schedule(40, 97) == values[40]


def test_bad_inputs_name_the_parameter():
    with pytest.raises(ValueError, match=r"warmup_fraction \+ decay_fraction must be <= 1, got 0.6 \+ 0.5"):
        WSD(warmup_fraction=0.6, decay_fraction=0.5)
    with pytest.raises(ValueError, match=r"warmup_fraction \+ decay_fraction"):
        WSDBeta(warmup_fraction=0.9, decay_fraction=0.2)
    with pytest.raises(ValueError, match="alpha must lie in \\[0, 1\\], got 1.5"):
        Constant(1.5)
    with pytest.raises(ValueError, match="alpha_max.*-0.1"):
        WSD(alpha_max=-0.1)
    with pytest.raises(ValueError, match="start"):
        LinearIncrease(start=2.0)
    with pytest.raises(ValueError, match="period_steps and num_periods"):
        Periodic()
    with pytest.raises(ValueError, match="period_steps and num_periods"):
        Periodic(period_steps=3, num_periods=2)
    with pytest.raises(ValueError, match="high must be >= low"):
        Periodic(low=0.8, high=0.2, period_steps=4)
    with pytest.raises(ValueError, match="total_steps"):
        Constant(0.5)(0, 0)
    with pytest.raises(ValueError, match="step"):
        LinearIncrease()(-1, 10)


@pytest.mark.parametrize(
    "decay,expected", [(0.01, [1.0, 1.0, 0.0]), (0.02, [1.0, 0.5, 0.0]), (0.03, [2 / 3, 1 / 3, 0.0])]
)
def test_wsd_short_decays_end_at_the_end_value(decay, expected):
    """Issue 7: with round(decay_fraction * T) = 1 nothing decayed (WSDLR(0.01, 0.01) was 1.0 at steps 98 and 99)."""
    lr = WSDLR(warmup_fraction=0.01, decay_fraction=decay, min_lr_ratio=0.0)
    assert [lr(s, 100) for s in (97, 98, 99)] == pytest.approx(expected)
    assert WSDLR(0.01, decay, min_lr_ratio=0.1)(99, 100) == pytest.approx(0.1)
    alpha = WSD(alpha_max=0.9, alpha_min=0.2, warmup_fraction=0.01, decay_fraction=decay)
    assert alpha(99, 100) == pytest.approx(0.2) and alpha(96, 100) == pytest.approx(0.9)


@pytest.mark.parametrize("warmup", [0.0, 0.5, 0.8, 0.9, 1.0])
def test_cosine_peaks_then_ends_at_min(warmup):
    """Issue 7: Cosine ended at its peak when the warm-up took >= T - 1 steps; now the warm-up is capped at T - 1
    steps, the peak is its last step, and the last step is min_lr_ratio whatever the warm-up."""
    T, cos = 10, Cosine(warmup_fraction=warmup, min_lr_ratio=0.1)
    values = [cos(s, T) for s in range(T)]
    w = min(round(warmup * T), T - 1)
    peak = max(w - 1, 0)
    assert values[peak] == pytest.approx(1.0) and max(values) == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(values[peak:], values[peak + 1 :]))  # strictly falling after the peak
    assert values[:w] == pytest.approx([(s + 1) / w for s in range(w)])
    # the cosine between: p = (s - peak) / (T - 1 - peak)
    mid = (peak + T - 1) // 2
    p = (mid - peak) / (T - 1 - peak)
    assert values[mid] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def test_steps_past_the_end_keep_the_last_value():
    """Lightning steps the LR scheduler once more after the last step: no decay phase, or one, past the end."""
    assert WSDLR(0.0, 0.0)(2, 2) == 1.0 and WSDLR(0.05, 0.2, min_lr_ratio=0.1)(12, 10) == pytest.approx(0.1)
    assert WSD(0.9, 0.1, 0.0, 0.0)(5, 2) == pytest.approx(0.9) and Cosine(0.0, 0.1)(20, 10) == pytest.approx(0.1)


def test_wsd_docstrings_first_step_values():
    """The documented first-step values: WSDBeta's defaults give alpha(0) = 1 - 1/w (0.0 at T = 100, 0.9 at
    T = 1000); WSD gives alpha(0) = alpha_min + (alpha_max - alpha_min) / w."""
    assert WSDBeta()(0, 100) == pytest.approx(0.0) and WSDBeta()(0, 1000) == pytest.approx(0.9)
    assert WSDBeta()(999, 1000) == pytest.approx(1.0) and WSDBeta()(500, 1000) == pytest.approx(0.0)
    assert WSD(0.9, 0.1, 0.05, 0.1)(0, 100) == pytest.approx(0.1 + 0.8 / 5)
