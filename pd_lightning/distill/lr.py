"""Learning-rate schedules: pure functions of (step, total_steps) -> multiplier of the peak LR.

Steps are 0-based (the last is ``T - 1``). Phase edges are shared with the WSD alpha schedules
(``pd_lightning.distill.schedules.WSD`` / ``WSDBeta``, linked to the ones here by ``link_wsd``):

    w = warmup_end  = round(warmup_fraction * T)            warm-up: steps 0 .. w-1
    decay_start     = max(T - round(decay_fraction * T), w)  decay:   steps decay_start .. T-1  (d = T - decay_start)

Shapes (``wsd_level``; Cosine the same way): the warm-up rises linearly as ``(s + 1) / w`` and reaches the peak on
its last step; the decay takes ``d`` steps below the peak, ``(T - 1 - s) / d`` of the way from the end value up to
the peak, so its last step is exactly the end value whatever ``d`` is (``d = 1``: only the last step, at the end
value); steps past the end keep the last value.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod


def phase_edges(total_steps: int, warmup_fraction: float, decay_fraction: float) -> tuple[int, int]:
    """Integer step where warm-up ends and where decay starts (shared by WSD-LR and WSD-alpha)."""
    warmup_end = round(warmup_fraction * total_steps)
    decay_start = total_steps - round(decay_fraction * total_steps)
    return warmup_end, max(decay_start, warmup_end)


def wsd_level(step: int, total_steps: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Warmup-stable-decay level in [0, 1]: ``(step + 1) / w`` in the warm-up, 1 on the plateau, then
    ``(T - 1 - step) / d`` in the ``d``-step decay (0 at the last step); module docstring."""
    warmup_end, decay_start = phase_edges(total_steps, warmup_fraction, decay_fraction)
    if step < warmup_end:
        return (step + 1) / warmup_end
    if step < decay_start or decay_start >= total_steps:  # (no decay phase: the plateau lasts, also past the end)
        return 1.0
    return max(0.0, (total_steps - 1 - step) / (total_steps - decay_start))


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


class LRSchedule(ABC):
    """Maps a step to a multiplier of the peak learning rate (``optimizer.lr``)."""

    @abstractmethod
    def __call__(self, step: int, total_steps: int) -> float: ...


class Constant(LRSchedule):
    """Constant LR after a linear warm-up.

    Args:
        warmup_fraction: fraction of the total steps spent warming up linearly from 0 to the peak.
    """

    def __init__(self, warmup_fraction: float = 0.0) -> None:
        _check_fraction("warmup_fraction", warmup_fraction)
        self.warmup_fraction = warmup_fraction

    def __call__(self, step: int, total_steps: int) -> float:
        warmup_end = round(self.warmup_fraction * total_steps)
        return min(1.0, (step + 1) / warmup_end) if warmup_end > 0 else 1.0


class Cosine(LRSchedule):
    """Linear warm-up then cosine decay to ``min_lr_ratio`` x peak at the last step (the paper's vanilla LR).

    Warm-up ``(s + 1) / w`` for ``s < w = min(round(warmup_fraction * T), T - 1)`` (capped so that at least the
    last step decays), peak at step ``max(w - 1, 0)``, then ``min + (1 - min) (1 + cos(pi p)) / 2`` with ``p`` going
    linearly from 0 at the peak step to 1 at the last step ``T - 1`` (exactly ``min_lr_ratio`` there).

    Args:
        warmup_fraction: fraction of the total steps spent warming up linearly from 0 to the peak.
        min_lr_ratio: final LR as a fraction of the peak.
    """

    def __init__(self, warmup_fraction: float = 0.01, min_lr_ratio: float = 0.1) -> None:
        _check_fraction("warmup_fraction", warmup_fraction)
        _check_fraction("min_lr_ratio", min_lr_ratio)
        self.warmup_fraction = warmup_fraction
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int, total_steps: int) -> float:
        warmup_end = min(round(self.warmup_fraction * total_steps), max(total_steps - 1, 0))
        if step < warmup_end:
            return (step + 1) / warmup_end
        peak = max(warmup_end - 1, 0)
        progress = min(1.0, (step - peak) / max(1, total_steps - 1 - peak))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WSDLR(LRSchedule):
    """Warmup-stable-decay (MiniCPM): linear warm-up, constant peak, then linear decay to ``min_lr_ratio``.

    ``(s + 1) / w`` in the warm-up, 1 on the plateau, ``min + (1 - min) (T - 1 - s) / d`` in the ``d``-step decay
    (``wsd_level``): exactly ``min_lr_ratio`` at the last step.

    Args:
        warmup_fraction: fraction of the total steps in the linear warm-up.
        decay_fraction: fraction of the total steps in the final decay (the stable phase is the rest).
        min_lr_ratio: LR at the last step as a fraction of the peak.
    """

    def __init__(self, warmup_fraction: float = 0.01, decay_fraction: float = 0.1, min_lr_ratio: float = 0.0) -> None:
        _check_fraction("warmup_fraction", warmup_fraction)
        _check_fraction("decay_fraction", decay_fraction)
        _check_fraction("min_lr_ratio", min_lr_ratio)
        if warmup_fraction + decay_fraction > 1.0:
            raise ValueError(f"warmup_fraction + decay_fraction must be <= 1, got {warmup_fraction} + {decay_fraction}")
        self.warmup_fraction = warmup_fraction
        self.decay_fraction = decay_fraction
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int, total_steps: int) -> float:
        level = wsd_level(step, total_steps, self.warmup_fraction, self.decay_fraction)
        _, decay_start = phase_edges(total_steps, self.warmup_fraction, self.decay_fraction)
        return level if step < decay_start else self.min_lr_ratio + (1.0 - self.min_lr_ratio) * level
