"""Per-token temperatures and weights applied to the sparse teacher target at training time.

A ``TargetTransform`` maps a chunk of student logits and the matching teacher target to ``Temperatures``: the
teacher's temperature per position (``F = softmax_kept(log p / tau_t)``), optionally a student temperature
(``log_softmax(z_s / tau_s)``) and a per-position weight on the KD term. ``DistillLoss`` applies them uniformly,
so every transform works with every loss.

The adaptive methods (the paper's Table 3) need statistics of the teacher's *full-vocabulary* distribution, which a
top-p-k support cannot give (METHOD.md): ``target.std`` (std of the raw logits) and ``target.entropy`` are stored
per token by the cache or the online teacher. The student's statistics come from its own full logits.
"""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pd_lightning.distill.target import SparseTarget

TAIL_EPS = 1e-6  # WTTM: a tail mass below this is rounding error of the kept sum (fp32 sums of ~100 entries)


@dataclass
class Temperatures:
    """What a transform returns for ``n`` positions.

    Attributes:
        teacher: ``(n,)`` teacher temperature ``tau_t`` (> 0).
        student: ``(n,)`` student temperature ``tau_s``, or ``None`` for the plain softmax (tau 1).
        weight: ``(n,)`` multiplier of the per-position KD loss, or ``None`` for 1.
    """

    teacher: Tensor
    student: Tensor | None = None
    weight: Tensor | None = None


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


class TargetTransform(nn.Module, ABC):
    """Base of the temperature plug-ins: ``forward(student_logits, target, context) -> Temperatures``."""

    def batch_context(self, target: SparseTarget, counted: Tensor) -> Tensor | None:
        """A statistic over the whole batch, computed once before chunking (``None`` when not needed).

        Args:
            target: the full batch's target (``N`` rows).
            counted: ``(N,)`` bool positions that count.
        """
        return None

    @abstractmethod
    def forward(self, student_logits: Tensor, target: SparseTarget, context: Tensor | None = None) -> Temperatures:
        """Temperatures for a chunk.

        Args:
            student_logits: ``(n, V)`` student logits in fp32 (part of the autograd graph).
            target: the ``n`` rows of the teacher target.
            context: what ``batch_context`` returned for the whole batch.
        """

    def _stat(self, target: SparseTarget, name: Literal["std", "entropy"]) -> Tensor:
        value = getattr(target, name)
        if value is None:
            raise ValueError(
                f"{type(self).__name__} needs the teacher's full-vocabulary {name} per token (target.{name}), but "
                "the data provides none: write the cache with that statistic or use StaticTemperature"
            )
        return value if value.dtype == torch.float64 else value.float()


class StaticTemperature(TargetTransform):
    """One temperature for the teacher target, ``F = softmax(Truncate(z_T) / tau)`` (METHOD.md; Table 2).

    Args:
        tau: teacher temperature, > 0 (1.0 = the paper's vanilla setting; PD* uses 2.0).
    """

    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        _check_positive("tau", tau)
        self.tau = tau

    def forward(self, student_logits: Tensor, target: SparseTarget, context: Tensor | None = None) -> Temperatures:
        return Temperatures(teacher=student_logits.new_full((student_logits.shape[0],), self.tau))


class NormKD(TargetTransform):
    """Normalised KD (Chi et al. 2023, arXiv 2308.00520; code gizi1/NormKD ``mdistiller/distillers/NormKD.py``).

    ``T_t = t_norm * sigma(z_t)``, ``T_s = t_norm * sigma(z_s)`` with ``sigma`` the standard deviation of each
    model's own logits over the full vocabulary; loss ``T_t^2 * KL(softmax(z_t / T_t) || softmax(z_s / T_s))``.
    As in the authors' code the student's sigma is not detached (gradients flow through it) and the weight is the
    teacher's ``T_t^2``. ``sigma(z_t)`` is the cached ``target.std``; ``sigma(z_s)`` is ``torch.std`` (unbiased,
    as the authors') of the student logits.

    Args:
        t_norm: base temperature (authors' defaults: 2.0 on CIFAR, 1.0 on ImageNet).
        eps: [D] lower bound on sigma, so a constant logit row cannot divide by zero (the authors have none).
    """

    def __init__(self, t_norm: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        _check_positive("t_norm", t_norm)
        _check_positive("eps", eps)
        self.t_norm = t_norm
        self.eps = eps

    def forward(self, student_logits: Tensor, target: SparseTarget, context: Tensor | None = None) -> Temperatures:
        tau_t = self.t_norm * self._stat(target, "std").to(student_logits).clamp(min=self.eps)  # (n,)
        tau_s = self.t_norm * student_logits.std(dim=-1).clamp(min=self.eps)  # (n,)
        return Temperatures(teacher=tau_t, student=tau_s, weight=tau_t**2)


class WTTM(TargetTransform):
    """Weighted Transformed Teacher Matching (Zheng & Yang, ICLR 2024, arXiv 2402.11148; code zkxufo/TTM ``wttm.py``).

    Teacher power-transformed ``p_t^gamma / sum_k p_t(k)^gamma`` (= temperature ``1 / gamma`` on the teacher only,
    student at T=1), per-token weight ``U_gamma = sum_k p_t(k)^gamma`` over the full vocabulary, no T^2 factor:
    ``L = mean_i U_gamma,i * KL(p_t,i^gamma || q_i)``, as in the authors' code.

    ``U_gamma`` needs the whole distribution. ``pd-lightning predict`` computes it in the teacher's forward pass
    over the full vocabulary and stores it per token (``--model.power_gammas``, default ``[0.5]``; float16,
    relative error <= 4.9e-4); that stored value (``target.power_sum(gamma)``) is used whenever the data has it.
    Only for data without it (an older cache, another gamma) is it approximated, with a warning: the kept entries
    give their part exactly, and the tail (mass ``t = 1 - sum_kept p``, spread over ``M = V - K`` unkept ids) is
    approximated [D] by ``tail`` -- on Zipf-tailed rows (V = 32,000, top-0.95-100, gamma 0.5) the ``"entropy"``
    default gave U / exact U with median 0.60 and range 0.33-1.08, so prefer a cache that stores the gamma:

    - ``"entropy"`` (default): the tail is taken as uniform over its effective support ``N = exp(H_tail)``, where
      ``H_tail = (H - H_kept + t log t) / t`` is the entropy of the renormalised tail, recovered from the stored
      full-vocabulary entropy ``H`` and the kept part ``H_kept = -sum_kept p log p``; tail part
      ``N^(1 - gamma) t^gamma`` with ``N`` clamped to ``[1, M]``. Exact whenever the tail is flat on its support.
    - ``"uniform"``: the tail spread over all ``M`` unkept ids, ``M^(1 - gamma) t^gamma`` (an upper bound for
      gamma < 1; LLM tails are far from uniform, so it overweights high-tail tokens).
    - ``"bucket"``: the tail as one outcome, ``t^gamma`` (a lower bound for gamma < 1).

    A tail mass below ``TAIL_EPS`` (1e-6) is taken as 0: it is rounding error of the kept sum.

    Args:
        gamma: power ``gamma = 1 / tau`` applied to the teacher, > 0 (gamma < 1 softens).
        tail: how the tail's share of ``U_gamma`` is approximated (see above).
    """

    def __init__(self, gamma: float = 0.5, tail: Literal["entropy", "uniform", "bucket"] = "entropy") -> None:
        super().__init__()
        _check_positive("gamma", gamma)
        if tail not in ("entropy", "uniform", "bucket"):
            raise ValueError(f"tail must be 'entropy', 'uniform' or 'bucket', got {tail!r}")
        self.gamma = gamma
        self.tail = tail

    def weight(self, target: SparseTarget, vocab_size: int) -> Tensor:
        """``(n,)`` ``U_gamma``: the stored full-vocabulary value, else the kept entries plus the tail approximation."""
        stored = target.power_sum(self.gamma)
        if stored is not None:
            return stored
        if not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(
                f"WTTM(gamma={self.gamma}): the teacher data stores no U_gamma for this gamma, so it is approximated "
                f"from the kept entries and the tail ({self.tail!r}), which distorts token weights (up to ~6x on "
                f"Zipf-tailed rows); write the cache with --model.power_gammas [{self.gamma}]",
                stacklevel=2,
            )
        valid = target.valid  # (n, K)
        logp = target.logprobs if target.logprobs.dtype == torch.float64 else target.logprobs.float()
        logp = torch.where(valid, logp, 0.0)  # (n, K); padding -> 0 (masked below)
        p = torch.where(valid, logp.exp(), 0.0)
        kept_u = torch.where(valid, (self.gamma * logp).exp(), 0.0).sum(-1)  # (n,)
        unkept = vocab_size - valid.sum(-1)  # (n,) M
        tail = 1.0 - p.sum(-1)  # (n,)
        # Rounding leaves ~1e-7 of "tail" on a complete support, and t^gamma magnifies it (1e-7^0.3 = 8e-3).
        tail = torch.where((tail > TAIL_EPS) & (unkept > 0), tail, 0.0)
        unkept = unkept.clamp(min=1).float()
        if self.tail == "bucket":
            support = torch.ones_like(tail)
        elif self.tail == "uniform":
            support = unkept
        else:
            h_kept = -(p * logp).sum(-1)  # (n,)
            safe_t = tail.clamp(min=1e-12)
            h_tail = (self._stat(target, "entropy") - h_kept + tail * safe_t.log()) / safe_t  # (n,)
            support = h_tail.clamp(max=math.log(vocab_size)).exp().clamp(min=1.0).minimum(unkept)
        return kept_u + support ** (1.0 - self.gamma) * tail**self.gamma

    def forward(self, student_logits: Tensor, target: SparseTarget, context: Tensor | None = None) -> Temperatures:
        n, vocab = student_logits.shape
        u = self.weight(target, vocab).to(student_logits)
        return Temperatures(teacher=student_logits.new_full((n,), 1.0 / self.gamma), weight=u)


def _masked_mean(x: Tensor, counted: Tensor) -> Tensor:
    """Mean of ``x`` over ``counted`` positions (0 when none count); 0-dim."""
    return torch.where(counted, x, 0.0).sum() / counted.sum().clamp(min=1)


def _adakd(
    x: Tensor,
    center: Tensor | None,
    mode: str,
    k: float,
    tau: float,
    w_range: tuple[float, float],
    tau_range: tuple[float, float],
) -> Temperatures:
    """Shared AdaKD formula: difficulty, weight and (in temperature mode) the per-token tau, see ``AdaKD_SD``."""
    center = x.mean() if center is None else center.to(x)  # batch mean; the chunk's own when called alone
    # w = exp(-1 / sqrt(d)) with d = exp(-k (x - mean)), i.e. w = exp(-exp(k (x - mean) / 2)).
    w = torch.exp(-torch.exp((0.5 * k * (x - center)).clamp(max=30.0))).clamp(*w_range)  # (n,)
    if mode == "weight":
        return Temperatures(teacher=torch.full_like(x, tau), weight=w)
    frac = (w - w_range[0]) / (w_range[1] - w_range[0])  # (n,) in [0, 1]
    return Temperatures(teacher=tau_range[0] + (tau_range[1] - tau_range[0]) * frac)


def _check_adakd(mode: str, w_range: tuple[float, float], tau_range: tuple[float, float], tau: float) -> None:
    if mode not in ("weight", "temperature"):
        raise ValueError(f"mode must be 'weight' or 'temperature', got {mode!r}")
    if not 0.0 <= w_range[0] < w_range[1] <= 1.0:
        raise ValueError(f"w_min < w_max must lie in [0, 1], got w_min={w_range[0]}, w_max={w_range[1]}")
    _check_positive("tau", tau)
    _check_positive("tau_min", tau_range[0])
    if not tau_range[1] >= tau_range[0]:
        raise ValueError(f"tau_max must be >= tau_min, got tau_min={tau_range[0]}, tau_max={tau_range[1]}")


class AdaKD_SD(TargetTransform):
    """AdaKD with the teacher's logit standard deviation as difficulty signal. A labelled RECONSTRUCTION [D].

    The paper's cited "AdaKD" could not be confirmed (METHOD.md). This follows the best candidate, Ganguly et al.
    2024 (arXiv 2405.08019): difficulty ``d_i = exp(-k (x_i - mean x))``, token weight
    ``w_i = exp(-1 / sqrt(d_i))`` clamped to ``[w_min, w_max]``; here ``x_i`` is the teacher's full-vocabulary
    logit std (``target.std``) and the mean is over the batch's counted positions. [D] choices:

    - ``k`` is constant (the original anneals it from positive to negative over training; the loss here is a pure
      function of the batch). With ``k > 0`` tokens above the batch mean get smaller weights.
    - ``mode="weight"``: ``w_i`` multiplies the token's KD loss, the teacher temperature is the static ``tau``.
    - ``mode="temperature"``: ``w_i`` is mapped linearly onto a teacher temperature,
      ``tau_i = tau_min + (tau_max - tau_min) (w_i - w_min) / (w_max - w_min)``, and the weight is 1.

    Args:
        mode: ``"weight"`` (per-token KD weight) or ``"temperature"`` (per-token teacher tau).
        k: difficulty sharpness and direction (see above).
        tau: teacher temperature in weight mode.
        w_min: lower clamp of the weight (the original's 0.1).
        w_max: upper clamp of the weight (the original's 0.9).
        tau_min: temperature at ``w_min`` in temperature mode.
        tau_max: temperature at ``w_max`` in temperature mode.
    """

    def __init__(
        self,
        mode: Literal["weight", "temperature"] = "weight",
        k: float = 1.0,
        tau: float = 1.0,
        w_min: float = 0.1,
        w_max: float = 0.9,
        tau_min: float = 0.5,
        tau_max: float = 2.0,
    ) -> None:
        super().__init__()
        _check_adakd(mode, (w_min, w_max), (tau_min, tau_max), tau)
        self.mode, self.k, self.tau = mode, k, tau
        self.w_min, self.w_max, self.tau_min, self.tau_max = w_min, w_max, tau_min, tau_max

    def batch_context(self, target: SparseTarget, counted: Tensor) -> Tensor:
        """Mean of the teacher's std over the batch's counted positions (0-dim)."""
        return _masked_mean(self._stat(target, "std"), counted)

    def forward(self, student_logits: Tensor, target: SparseTarget, context: Tensor | None = None) -> Temperatures:
        x = self._stat(target, "std").to(student_logits)  # (n,)
        return _adakd(x, context, self.mode, self.k, self.tau, (self.w_min, self.w_max), (self.tau_min, self.tau_max))


class AdaKD_H(TargetTransform):
    """AdaKD with the teacher's full-vocabulary entropy as difficulty signal. A labelled RECONSTRUCTION [D].

    Exactly ``AdaKD_SD`` (same formula, [D] choices and parameters) with ``x_i`` the teacher's entropy in nats
    (``target.entropy``).

    Args:
        mode: ``"weight"`` (per-token KD weight) or ``"temperature"`` (per-token teacher tau).
        k: difficulty sharpness and direction; with ``k > 0`` high-entropy tokens get smaller weights.
        tau: teacher temperature in weight mode.
        w_min: lower clamp of the weight (the original's 0.1).
        w_max: upper clamp of the weight (the original's 0.9).
        tau_min: temperature at ``w_min`` in temperature mode.
        tau_max: temperature at ``w_max`` in temperature mode.
    """

    def __init__(
        self,
        mode: Literal["weight", "temperature"] = "weight",
        k: float = 1.0,
        tau: float = 1.0,
        w_min: float = 0.1,
        w_max: float = 0.9,
        tau_min: float = 0.5,
        tau_max: float = 2.0,
    ) -> None:
        super().__init__()
        _check_adakd(mode, (w_min, w_max), (tau_min, tau_max), tau)
        self.mode, self.k, self.tau = mode, k, tau
        self.w_min, self.w_max, self.tau_min, self.tau_max = w_min, w_max, tau_min, tau_max

    def batch_context(self, target: SparseTarget, counted: Tensor) -> Tensor:
        """Mean of the teacher's entropy over the batch's counted positions (0-dim)."""
        return _masked_mean(self._stat(target, "entropy"), counted)

    def forward(self, student_logits: Tensor, target: SparseTarget, context: Tensor | None = None) -> Temperatures:
        x = self._stat(target, "entropy").to(student_logits)  # (n,)
        return _adakd(x, context, self.mode, self.k, self.tau, (self.w_min, self.w_max), (self.tau_min, self.tau_max))
