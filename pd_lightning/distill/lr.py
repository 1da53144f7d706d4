"""Learning-rate schedules: pure functions of (step, total_steps) -> multiplier of the peak LR.

Phase edges are shared with the WSD alpha schedule (``pd_lightning.distill.schedules.WSD``), which LightningCLI
links to the ones here, so both use the same integer edges:

    warmup_end  = round(warmup_fraction * total)
    decay_start = total - round(decay_fraction * total)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod


def phase_edges(total_steps: int, warmup_fraction: float, decay_fraction: float) -> tuple[int, int]:
    """Integer step where warm-up ends and where decay starts (shared by WSD-LR and WSD-alpha)."""
    warmup_end = round(warmup_fraction * total_steps)
    decay_start = total_steps - round(decay_fraction * total_steps)
    return warmup_end, max(decay_start, warmup_end)


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
        warmup_end = round(self.warmup_fraction * total_steps)
        if step < warmup_end:
            return (step + 1) / warmup_end
        span = max(1, total_steps - 1 - warmup_end)
        progress = min(1.0, (step - warmup_end) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WSDLR(LRSchedule):
    """Warmup-stable-decay (MiniCPM): linear warm-up, constant peak, then linear decay to ``min_lr_ratio``.

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
        warmup_end, decay_start = phase_edges(total_steps, self.warmup_fraction, self.decay_fraction)
        if step < warmup_end:
            return (step + 1) / warmup_end
        if step < decay_start:
            return 1.0
        span = max(1, total_steps - 1 - decay_start)
        progress = min(1.0, (step - decay_start) / span)
        return 1.0 - (1.0 - self.min_lr_ratio) * progress
