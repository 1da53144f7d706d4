"""KD-weight schedules: pure functions ``alpha(step, total_steps) -> [0, 1]`` (METHOD.md, Table 5).

``alpha`` weights the KD term, ``L = (1 - alpha) L_lm + alpha L_kd``. A schedule holds only its constructor
parameters, so resuming from a checkpoint needs nothing but the global step. Steps are 0-based: the first step is
0 and the last is ``total_steps - 1``; steps past the end are treated as the last one.

The paper gives the shapes but not their endpoints, period or WSD fractions; all are parameters [D].
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

from pd_lightning.distill.lr import wsd_level


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def _check_steps(step: int, total_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


def _progress(step: int, total_steps: int) -> float:
    """0 at the first step, 1 at the last (and after it)."""
    return min(1.0, step / max(1, total_steps - 1))


class AlphaScheduler(ABC):
    """Maps ``(step, total_steps)`` to the KD weight ``alpha`` in [0, 1]; no state besides the parameters."""

    @abstractmethod
    def __call__(self, step: int, total_steps: int) -> float: ...


class Constant(AlphaScheduler):
    """Static alpha (Table 4; best 0.9).

    Args:
        alpha: the KD weight, in [0, 1] (0 = LM only, 1 = pure KD).
    """

    def __init__(self, alpha: float = 1.0) -> None:
        _check_unit("alpha", alpha)
        self.alpha = alpha

    def __call__(self, step: int, total_steps: int) -> float:
        _check_steps(step, total_steps)
        return self.alpha


class LinearIncrease(AlphaScheduler):
    """Linear ramp from ``start`` at step 0 to ``end`` at the last step (Table 5, "Linear Inc").

    Args:
        start: alpha at the first step, in [0, 1].
        end: alpha at the last step, in [0, 1].
    """

    def __init__(self, start: float = 0.0, end: float = 1.0) -> None:
        _check_unit("start", start)
        _check_unit("end", end)
        self.start, self.end = start, end

    def __call__(self, step: int, total_steps: int) -> float:
        _check_steps(step, total_steps)
        return self.start + (self.end - self.start) * _progress(step, total_steps)


class LinearDecrease(AlphaScheduler):
    """Linear ramp from ``start`` at step 0 down to ``end`` at the last step (Table 5, "Linear Dec").

    Args:
        start: alpha at the first step, in [0, 1].
        end: alpha at the last step, in [0, 1].
    """

    def __init__(self, start: float = 1.0, end: float = 0.0) -> None:
        _check_unit("start", start)
        _check_unit("end", end)
        self.start, self.end = start, end

    def __call__(self, step: int, total_steps: int) -> float:
        _check_steps(step, total_steps)
        return self.start + (self.end - self.start) * _progress(step, total_steps)


class Periodic(AlphaScheduler):
    """Alpha oscillating between ``low`` and ``high`` (Table 5, "Period"; its shape is unknown [D]).

    With phase ``phi = (step mod P) / P`` in [0, 1), every shape starts a period at ``low``:

    - ``"cosine"``: ``low + (high - low) (1 - cos(2 pi phi)) / 2`` (``high`` at mid-period);
    - ``"triangle"``: ``low + (high - low) (1 - |2 phi - 1|)``;
    - ``"square"``: ``low`` for the first half of each period, ``high`` for the second.

    Args:
        low: smallest alpha, in [0, 1].
        high: largest alpha, in [0, 1], >= low.
        period_steps: period ``P`` in steps; give this or ``num_periods``.
        num_periods: number of periods over the whole run (``P = total_steps / num_periods``).
        shape: ``"cosine"``, ``"triangle"`` or ``"square"``.
    """

    def __init__(
        self,
        low: float = 0.0,
        high: float = 1.0,
        period_steps: int | None = None,
        num_periods: int | None = None,
        shape: Literal["cosine", "triangle", "square"] = "cosine",
    ) -> None:
        _check_unit("low", low)
        _check_unit("high", high)
        if high < low:
            raise ValueError(f"high must be >= low, got low={low}, high={high}")
        if (period_steps is None) == (num_periods is None):
            raise ValueError(
                f"give exactly one of period_steps and num_periods, got {period_steps=} and {num_periods=}"
            )
        if period_steps is not None and period_steps < 1:
            raise ValueError(f"period_steps must be >= 1, got {period_steps}")
        if num_periods is not None and num_periods < 1:
            raise ValueError(f"num_periods must be >= 1, got {num_periods}")
        if shape not in ("cosine", "triangle", "square"):
            raise ValueError(f"shape must be 'cosine', 'triangle' or 'square', got {shape!r}")
        self.low, self.high = low, high
        self.period_steps, self.num_periods, self.shape = period_steps, num_periods, shape

    def __call__(self, step: int, total_steps: int) -> float:
        _check_steps(step, total_steps)
        period = self.period_steps if self.period_steps is not None else total_steps / self.num_periods
        phase = (step % period) / period  # [0, 1)
        if self.shape == "cosine":
            level = 0.5 * (1.0 - math.cos(2.0 * math.pi * phase))
        elif self.shape == "triangle":
            level = 1.0 - abs(2.0 * phase - 1.0)
        else:
            level = 0.0 if phase < 0.5 else 1.0
        return self.low + (self.high - self.low) * level


def _check_wsd(warmup_fraction: float, decay_fraction: float) -> None:
    _check_unit("warmup_fraction", warmup_fraction)
    _check_unit("decay_fraction", decay_fraction)
    if warmup_fraction + decay_fraction > 1.0:
        raise ValueError(f"warmup_fraction + decay_fraction must be <= 1, got {warmup_fraction} + {decay_fraction}")


def wsd_shape(step: int, total_steps: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Warmup-stable-decay level in [0, 1], with the same integer edges and ramps as ``lr.WSDLR`` (``lr.wsd_level``).

    With ``w = round(warmup_fraction * T)`` and a decay of ``d = T - decay_start`` steps: ``(step + 1) / w`` in the
    warm-up (1 on its last step, never 0: step 0 is at ``1 / w``), 1 on the plateau, ``(T - 1 - step) / d`` in the
    decay (0 exactly at the last step, also when ``d = 1``).
    """
    _check_steps(step, total_steps)
    return wsd_level(step, total_steps, warmup_fraction, decay_fraction)


class WSD(AlphaScheduler):
    """WSD-alpha: alpha warms up, holds while the LR is at its peak, then decays (Table 5; best with WSD-LR).

    ``alpha = alpha_min + (alpha_max - alpha_min) * wsd_shape(step)``; the phase edges equal ``lr.WSDLR``'s when
    the fractions are linked (``DistillationModule(link_wsd=True)``). PD* uses ``alpha_max = 0.9``. The warm-up
    ramps from ``alpha_min`` (before step 0) to ``alpha_max`` on its last step, so the first step already has
    ``alpha(0) = alpha_min + (alpha_max - alpha_min) / w`` (``alpha_max`` when ``w <= 1``); the last step has
    ``alpha_min`` when there is a decay phase.

    Args:
        alpha_max: alpha on the plateau, in [0, 1].
        alpha_min: alpha at the last step (with a decay phase) and the level the warm-up ramps up from, in [0, 1].
        warmup_fraction: fraction of the total steps in the warm-up (same as the WSD learning rate's).
        decay_fraction: fraction of the total steps in the final decay (same as the WSD learning rate's).
    """

    def __init__(
        self, alpha_max: float = 1.0, alpha_min: float = 0.0, warmup_fraction: float = 0.01, decay_fraction: float = 0.1
    ) -> None:
        _check_unit("alpha_max", alpha_max)
        _check_unit("alpha_min", alpha_min)
        _check_wsd(warmup_fraction, decay_fraction)
        self.alpha_max, self.alpha_min = alpha_max, alpha_min
        self.warmup_fraction, self.decay_fraction = warmup_fraction, decay_fraction

    def __call__(self, step: int, total_steps: int) -> float:
        level = wsd_shape(step, total_steps, self.warmup_fraction, self.decay_fraction)
        return self.alpha_min + (self.alpha_max - self.alpha_min) * level


class WSDBeta(AlphaScheduler):
    """WSD-beta: the WSD shape on the LM weight ``beta = 1 - alpha`` (Table 5).

    ``beta = beta_min + (beta_max - beta_min) * wsd_shape(step)`` and ``alpha = 1 - beta``. With the defaults
    (``beta_max = 1``, ``beta_min = 0``): ``alpha(0) = 1 - 1 / w`` with ``w = round(warmup_fraction * T)`` (0.0 at
    T = 100 with the default 0.01, where the warm-up is one step; 0.9 at T = 1000), falling to 0 (LM only) on the
    last warm-up step and the plateau, then rising through the decay to 1 (pure KD) at the last step.

    Args:
        beta_max: beta on the plateau, in [0, 1].
        beta_min: beta at the last step (with a decay phase) and the level the warm-up ramps up from, in [0, 1].
        warmup_fraction: fraction of the total steps in the warm-up (same as the WSD learning rate's).
        decay_fraction: fraction of the total steps in the final decay (same as the WSD learning rate's).
    """

    def __init__(
        self, beta_max: float = 1.0, beta_min: float = 0.0, warmup_fraction: float = 0.01, decay_fraction: float = 0.1
    ) -> None:
        _check_unit("beta_max", beta_max)
        _check_unit("beta_min", beta_min)
        _check_wsd(warmup_fraction, decay_fraction)
        self.beta_max, self.beta_min = beta_max, beta_min
        self.warmup_fraction, self.decay_fraction = warmup_fraction, decay_fraction

    def __call__(self, step: int, total_steps: int) -> float:
        level = wsd_shape(step, total_steps, self.warmup_fraction, self.decay_fraction)
        return 1.0 - (self.beta_min + (self.beta_max - self.beta_min) * level)
