"""``TargetCollector``: turns the logits a loss pass shows chunk by chunk into one sparse target.

Passed as ``observe`` to :func:`pd_lightning.distill.objective.lm_kd_loss`, it runs the ``LogitsProcessor`` on each
chunk's full fp32 logits as the fused loss computes them, so the full ``(N, V)`` logits are never materialised and
no second forward runs. The per-position statistics (std, entropy, tail mass, ``U_gamma``) come from each row's full
distribution, exactly as :class:`~pd_lightning.distill.processors.LogitsProcessor` computes them offline: a row is
never split across chunks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pd_lightning.distill.processors import LogitsProcessor
from pd_lightning.distill.target import SparseTarget


def _pad(x: Tensor, width: int, value: float) -> Tensor:
    return x if x.shape[1] == width else torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


class TargetCollector:
    """Collects ``processor(logits_chunk)`` over the chunks of one loss pass.

    Args:
        processor: the truncation (TopPK, Sampled, Full), as offline.
        keys: ``(N,)`` int64 per-position keys (``position_keys``) for stochastic processors, or ``None``.
        gammas: powers whose ``U_gamma`` is computed from the full distribution.
    """

    def __init__(self, processor: LogitsProcessor, keys: Tensor | None, gammas: tuple[float, ...]) -> None:
        self.processor, self.keys, self.gammas = processor, keys, tuple(gammas)
        self.parts: list[tuple[int, SparseTarget]] = []

    def __call__(self, rows: slice, logits: Tensor) -> None:
        keys = None if self.keys is None else self.keys[rows]
        if keys is None:
            start = rows.start or 0
            keys = torch.arange(start, start + logits.shape[0], device=logits.device, dtype=torch.int64)
        self.parts.append((rows.start or 0, self.processor(logits, keys, gammas=self.gammas)))

    def target(self) -> SparseTarget:
        """The rows seen so far, in row order, padded to one width (ids 0, log-probabilities -inf)."""
        if not self.parts:
            raise RuntimeError("the loss pass showed no logits to the collector")
        parts = [t for _, t in sorted(self.parts, key=lambda p: p[0])]
        width = max(t.ids.shape[1] for t in parts)

        def cat(name: str) -> Tensor | None:
            values = [getattr(t, name) for t in parts]
            return None if values[0] is None else torch.cat(values)

        sums = None
        if parts[0].power_sums:
            sums = {g: torch.cat([t.power_sums[g] for t in parts]) for g in parts[0].power_sums}
        return SparseTarget(
            ids=torch.cat([_pad(t.ids, width, 0) for t in parts]),
            logprobs=torch.cat([_pad(t.logprobs, width, -math.inf) for t in parts]),
            std=cat("std"),
            entropy=cat("entropy"),
            tail=cat("tail"),
            power_sums=sums,
        )
