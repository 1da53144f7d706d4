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


@dataclass
class SparseTarget:
    """A truncated teacher distribution per position.

    Attributes:
        ids: ``(N, K)`` int64 vocabulary ids of the kept entries; padding entries hold 0.
        logprobs: ``(N, K)`` float32 log-probabilities under the teacher's *full-vocabulary* softmax at
            temperature 1, so ``1 - exp(logprobs).sum(-1)`` is the tail mass; ``-inf`` marks padding.
        std: ``(N,)`` standard deviation of the teacher's raw logits over the full vocabulary (or ``None``).
        entropy: ``(N,)`` entropy in nats of the teacher's full distribution at tau=1 (or ``None``).
    """

    ids: Tensor
    logprobs: Tensor
    std: Tensor | None = None
    entropy: Tensor | None = None

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
        )

    @classmethod
    def from_batch(cls, batch: dict[str, Tensor]) -> SparseTarget | None:
        """Build the flattened target from a training batch, or ``None`` when the batch carries none."""
        if TEACHER_IDS not in batch:
            return None
        ids = batch[TEACHER_IDS]
        k = ids.shape[-1]
        std, entropy = batch.get(TEACHER_STD), batch.get(TEACHER_ENTROPY)
        return cls(
            ids=ids.reshape(-1, k).long(),
            logprobs=batch[TEACHER_LOGPROBS].reshape(-1, k).float(),
            std=None if std is None else std.reshape(-1).float(),
            entropy=None if entropy is None else entropy.reshape(-1).float(),
        )
