"""The sparse teacher target: the one shape that flows from a logits cache (or an online teacher) into a loss.

Every producer (``LogitsProcessor`` online, the HDF5 cache reader offline) builds a ``SparseTarget``; every
consumer (``TargetTransform`` temperatures, ``DistillLoss``) reads one. Positions are flattened: ``N`` is the
number of token positions (``B * T`` for a batch), ``K`` the padded number of kept entries per position.

Alignment: row ``n`` is the teacher's distribution over the *next* token, i.e. it lines up with the student's
logits at the same position and with ``labels[n]`` (= ``input_ids[n + 1]``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

# Batch keys used by data modules and the training step (documented once here).
TEACHER_IDS = "teacher_ids"  # (B, T, K) int64, padding entries hold 0
TEACHER_LOGPROBS = "teacher_logprobs"  # (B, T, K) float32, log p under the full-vocab softmax at tau=1; -inf = padding
TEACHER_STD = "teacher_std"  # (B, T) float32, std of the teacher's raw logits over the full vocabulary
TEACHER_ENTROPY = "teacher_entropy"  # (B, T) float32, entropy (nats) of the teacher's full distribution at tau=1
TEACHER_TAIL = "teacher_tail"  # (B, T) float32, teacher mass outside the kept entries, from the full distribution
TEACHER_POWER_SUM = "teacher_power_sum@"  # + f"{gamma:g}": (B, T) float32, U_gamma = sum_v p_v^gamma (full vocab)


def power_sum_key(gamma: float) -> str:
    """Batch key of the stored ``U_gamma = sum_v p_v^gamma`` for ``gamma`` (e.g. ``teacher_power_sum@0.5``)."""
    return f"{TEACHER_POWER_SUM}{float(gamma):g}"


@dataclass
class SparseTarget:
    """A truncated teacher distribution per position.

    Attributes:
        ids: ``(N, K)`` int64 vocabulary ids of the kept entries; padding entries hold 0.
        logprobs: ``(N, K)`` float32 log-probabilities under the teacher's *full-vocabulary* softmax at
            temperature 1, so ``1 - exp(logprobs).sum(-1)`` is the tail mass; ``-inf`` marks padding.
        std: ``(N,)`` standard deviation of the teacher's raw logits over the full vocabulary (or ``None``).
        entropy: ``(N,)`` entropy in nats of the teacher's full distribution at tau=1 (or ``None``).
        tail: ``(N,)`` the teacher's probability mass outside the kept entries, ``sum_{v not kept} p_v``, computed
            from the full distribution (exact where ``1 - sum exp(logprobs)`` of quantised entries is not), or
            ``None`` (then consumers fall back to ``1 - kept_mass``).
        power_sums: ``{gamma: (N,)}`` with ``U_gamma = sum_v p_v^gamma`` over the full vocabulary (WTTM's
            per-token weight), for the gammas the producer was asked for, or ``None``.
    """

    ids: Tensor
    logprobs: Tensor
    std: Tensor | None = None
    entropy: Tensor | None = None
    tail: Tensor | None = None
    power_sums: dict[float, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 2:
            raise ValueError(
                f"SparseTarget: ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} "
                "must both be (N, K)"
            )

    @property
    def valid(self) -> Tensor:
        """``(N, K)`` bool: which entries are real (not padding)."""
        return torch.isfinite(self.logprobs)

    @property
    def kept_mass(self) -> Tensor:
        """``(N,)`` probability mass the teacher puts on the kept entries (1 - tail mass)."""
        return self.logprobs.float().exp().sum(-1)

    def select(self, index: Tensor | slice) -> SparseTarget:
        """Rows ``index`` of every field (for chunking over positions)."""
        return replace(
            self,
            ids=self.ids[index],
            logprobs=self.logprobs[index],
            std=None if self.std is None else self.std[index],
            entropy=None if self.entropy is None else self.entropy[index],
            tail=None if self.tail is None else self.tail[index],
            power_sums=None if self.power_sums is None else {g: u[index] for g, u in self.power_sums.items()},
        )

    def power_sum(self, gamma: float) -> Tensor | None:
        """The stored ``U_gamma`` for ``gamma`` (matched to 1e-9), or ``None`` when it was not stored."""
        for g, u in (self.power_sums or {}).items():
            if abs(g - gamma) <= 1e-9:
                return u
        return None

    @classmethod
    def from_batch(cls, batch: dict[str, Tensor]) -> SparseTarget | None:
        """Build the flattened target from a training batch, or ``None`` when the batch carries none."""
        if TEACHER_IDS not in batch:
            return None
        ids = batch[TEACHER_IDS]
        k = ids.shape[-1]
        std, entropy, tail = batch.get(TEACHER_STD), batch.get(TEACHER_ENTROPY), batch.get(TEACHER_TAIL)
        sums = {float(key[len(TEACHER_POWER_SUM) :]): v.reshape(-1).float() for key, v in batch.items()
                if key.startswith(TEACHER_POWER_SUM)}  # fmt: skip
        return cls(
            ids=ids.reshape(-1, k).long(),
            logprobs=batch[TEACHER_LOGPROBS].reshape(-1, k).float(),
            std=None if std is None else std.reshape(-1).float(),
            entropy=None if entropy is None else entropy.reshape(-1).float(),
            tail=None if tail is None else tail.reshape(-1).float(),
            power_sums=sums or None,
        )
