"""Distillation losses ``D(P_S, F)`` between the student and a sparse (truncated) teacher target.

The KD term of the objective (METHOD.md, "Objective") is ``L_kd = mean_t D(P_S(.|x_<t), F(z_T(.|x_<t)))`` with
``F = softmax(Truncate(z_T) / tau)``: the teacher's kept log-probabilities divided by ``tau`` and renormalised over
the kept set. Every loss here is a sum over the kept entries of one per-entry term, so the base class does all the
shared work once -- fp32 upcast, the teacher target ``F``, the student's log-probabilities on the kept ids,
temperatures and per-token weights from a ``TargetTransform``, the optional tail bucket, masking, chunking and the
mean over counted positions -- and each subclass implements only ``divergence`` (one line of algebra).

Notation in the docstrings: ``F_k`` teacher target probability of kept entry ``k``, ``q_k`` the student's
probability of the same vocabulary id under its *full-vocabulary* softmax (at the student temperature, 1 by
default). Without the tail bucket ``sum_k q_k <= 1`` (the student may put mass outside the kept set); with it both
sides are proper distributions over ``K + 1`` outcomes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pd_lightning.distill.target import SparseTarget
from pd_lightning.distill.temperature import TargetTransform, Temperatures


def upcast(x: Tensor) -> Tensor:
    """At least fp32 (fp64 stays fp64 so ``gradcheck`` can run in double precision)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class DistillLoss(nn.Module, ABC):
    """Base of the KD losses: the shared work, written once; subclasses give the per-entry ``divergence``.

    Per counted position ``i`` the loss is ``w_i * sum_k divergence(log q_ik, log F_ik)`` over the valid kept
    entries (plus the tail bucket), and the batch loss is the mean over counted positions.

    - Teacher target: ``log F = log_softmax_kept(logprobs / tau_t)`` (METHOD.md: temperature on the teacher only).
    - Student: ``log q = log_softmax(logits / tau_s)`` over the full vocabulary, gathered at the kept ids;
      ``tau_s = 1`` unless the transform sets a student temperature or ``hinton`` is on.
    - Temperatures and the per-token weight ``w_i`` come from a ``TargetTransform`` (static tau=1 when none).
    - Counted positions [D]: ``mask`` and at least one kept entry in the target (an empty target has nothing to
      match, so it neither adds 0 nor enters the mean's denominator).

    Args:
        tail_bucket: [D] add one extra outcome per position: the teacher's tail mass at tau=1 (``target.tail``,
            summed over the full distribution by the teacher and stored per token; ``1 - sum_k p_k`` of the kept
            log-probs only for data without it) against the student's mass outside the kept set (the
            "ghost token" of Megatron-LM's offline KD). With ``tau != 1`` the temperature reshapes the kept part
            only, ``F_k = (1 - tail) * softmax_kept(log p_k / tau)``, and the tail keeps its tau=1 mass, since the
            tail's own shape is not stored. The tail entry is dropped where the teacher's tail mass is 0.
        hinton: [D] Hinton-style distillation, off by default (METHOD.md): the teacher's temperature is applied to
            the student too (``tau_s = tau_t``) and the per-token loss is multiplied by ``tau_t ** 2``. Not
            combinable with a transform that sets its own student temperature (NormKD).
    """

    # Whether the loss reads the student beyond its log-probabilities at the kept ids (ULD sorts its distribution);
    # such a loss takes the objective's generic route, which gives it the chunk's full logits.
    full_student = False

    def __init__(self, tail_bucket: bool = False, hinton: bool = False) -> None:
        super().__init__()
        self.tail_bucket = tail_bucket
        self.hinton = hinton

    @abstractmethod
    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        """Per-entry terms whose sum over a position's valid entries is the divergence.

        Args:
            s_logp: ``(n, K')`` student log-probabilities ``log q`` at the kept ids (and tail bucket).
            t_logp: ``(n, K')`` teacher target log-probabilities ``log F``; both are finite everywhere
                (invalid entries hold 0 and are zeroed by the base after this call).

        Returns:
            ``(n, K')`` terms.
        """

    @staticmethod
    def counted(target: SparseTarget, mask: Tensor | None = None) -> Tensor:
        """``(N,)`` bool: positions that count -- in ``mask`` (all when ``None``) and with a non-empty target."""
        has_target = target.valid.any(-1)  # (N,)
        return has_target if mask is None else mask & has_target

    def temperatures(
        self,
        logits: Tensor,
        target: SparseTarget,
        counted: Tensor,
        transform: TargetTransform | None = None,
        context: Tensor | None = None,
    ) -> Temperatures:
        """The transform's temperatures with ``hinton`` applied; neutral (tau 1, weight 0) where not counted.

        Positions that do not count may carry garbage statistics (padding); neutral values there keep the backward
        pass free of NaN (``torch.where`` passes ``0 * NaN = NaN`` to the unselected branch otherwise).
        """
        dtype = logits.dtype
        tau_t = tau_s = weight = None
        if transform is not None:
            temps = transform(logits, target, context)
            tau_t, tau_s, weight = temps.teacher, temps.student, temps.weight
        if self.hinton:
            if tau_s is not None:
                raise ValueError(
                    f"hinton=True cannot be combined with {type(transform).__name__}, which sets its own student "
                    "temperature"
                )
            tau_s = tau_t
            if tau_t is not None:
                weight = tau_t.to(dtype) ** 2 if weight is None else weight * tau_t.to(dtype) ** 2
        ones = torch.ones(logits.shape[0], dtype=dtype, device=logits.device)
        return Temperatures(
            teacher=ones if tau_t is None else torch.where(counted, tau_t.to(dtype), 1.0),  # (n,)
            student=None if tau_s is None else torch.where(counted, tau_s.to(dtype), 1.0),  # (n,)
            weight=None if weight is None else torch.where(counted, weight.to(dtype), 0.0),  # (n,)
        )

    def token_losses(
        self,
        logits: Tensor,
        target: SparseTarget,
        counted: Tensor,
        transform: TargetTransform | None = None,
        context: Tensor | None = None,
        student_logp: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Weighted per-position loss for one chunk of positions, from the student's logits.

        Args:
            logits: ``(n, V)`` student logits (upcast to fp32 here).
            target: the ``n`` rows of the sparse teacher target.
            counted: ``(n,)`` bool positions that count (see ``counted``); the others return exactly 0.
            transform: temperatures / weights per position; ``None`` = static tau 1.
            context: the transform's batch statistic from ``transform.batch_context`` (computed once per batch so
                that chunking does not change the result).
            student_logp: ``(n, V)`` precomputed ``log_softmax(logits)`` to reuse when the student temperature is
                1 (the LM loss already has it).

        Returns:
            ``(n,)`` loss per position (0 where not counted) and ``(n,)`` teacher temperature per position.
        """
        logits = upcast(logits)  # (n, V)
        temps = self.temperatures(logits, target, counted, transform, context)
        if temps.student is None:
            s_full = student_logp if student_logp is not None else F.log_softmax(logits, dim=-1)  # (n, V)
        else:
            s_full = F.log_softmax(logits / temps.student[:, None], dim=-1)  # (n, V)
        s_tail = None
        if self.tail_bucket:
            # Student tail: log of its mass on the ids outside the kept set, exactly (no 1 - sum cancellation).
            n, vocab = logits.shape
            valid = target.valid  # (n, K)
            rows = torch.arange(n, device=logits.device)[:, None].expand_as(valid)
            kept = torch.zeros(n, vocab, dtype=torch.bool, device=logits.device)
            kept[rows[valid], target.ids[valid]] = True  # (n, V)
            has_tail = ~kept.all(-1)  # (n,); -inf tail (no NaN gradient) where the kept set is everything
            outside = torch.where(has_tail[:, None], s_full.masked_fill(kept, float("-inf")), s_full)
            s_tail = torch.where(has_tail, torch.logsumexp(outside, dim=-1), float("-inf"))  # (n,)
        per_token = self.kept_losses(s_full.gather(1, target.ids), target, counted, temps, s_tail)
        return per_token, temps.teacher.detach()

    def kept_losses(
        self,
        s_logp: Tensor,
        target: SparseTarget,
        counted: Tensor,
        temps: Temperatures,
        s_tail: Tensor | None = None,
    ) -> Tensor:
        """Weighted per-position loss from the student's log-probabilities at the kept ids.

        Args:
            s_logp: ``(n, K)`` student log-probabilities ``log q`` at ``target.ids`` (at its temperature).
            target: the ``n`` rows of the sparse teacher target.
            counted: ``(n,)`` bool positions that count.
            temps: from ``temperatures`` (teacher temperature and weight are used here).
            s_tail: ``(n,)`` log of the student's mass outside the kept set; required when ``tail_bucket``.

        Returns:
            ``(n,)`` loss per position, 0 where not counted.
        """
        dtype = s_logp.dtype
        valid = target.valid  # (n, K)
        # Teacher target F: kept log-probs / tau_t, renormalised over the kept set (padding stays -inf).
        t_raw = target.logprobs.to(dtype)  # (n, K)
        t_logp = torch.log_softmax(t_raw / temps.teacher[:, None], dim=-1)  # (n, K); NaN on empty rows (masked)
        if self.tail_bucket:
            if s_tail is None:
                raise ValueError("tail_bucket=True needs the student's tail mass (s_tail)")
            if target.tail is not None:  # stored from the full distribution: exact for small tails too
                tail = target.tail.to(dtype).clamp(0.0, 1.0)  # (n,)
                kept_mass, t_tail = 1.0 - tail, tail.log()  # log 0 = -inf: no tail entry
            else:  # derived from the (quantised) kept entries: tails below ~1e-4 may round to 0
                kept_mass = torch.where(valid, t_raw.exp(), 0.0).sum(-1).clamp(max=1.0)  # (n,)
                t_tail = torch.log1p(-kept_mass)  # (n,) log of the tau=1 tail mass; -inf when there is none
            t_logp = t_logp + kept_mass.log()[:, None]  # F_k = (1 - tail) * softmax_kept(...)
            s_logp = torch.cat([s_logp, s_tail[:, None]], dim=-1)  # (n, K + 1)
            t_logp = torch.cat([t_logp, t_tail[:, None]], dim=-1)  # (n, K + 1)
            tail_ok = (kept_mass < 1.0) & torch.isfinite(s_tail)  # (n,)
            valid = torch.cat([valid, tail_ok[:, None]], dim=-1)  # (n, K + 1)
        valid = valid & counted[:, None]
        t_logp = torch.where(valid, t_logp, 0.0)
        s_logp = torch.where(valid, s_logp, 0.0)
        per_token = torch.where(valid, self.divergence(s_logp, t_logp), 0.0).sum(-1)  # (n,)
        return per_token if temps.weight is None else per_token * temps.weight

    def _chunk_sum(
        self,
        logits: Tensor,
        target: SparseTarget,
        counted: Tensor,
        transform: TargetTransform | None,
        context: Tensor | None,
    ) -> Tensor:
        return self.token_losses(logits, target, counted, transform, context)[0].sum()

    def forward(
        self,
        logits: Tensor,
        target: SparseTarget,
        mask: Tensor | None = None,
        transform: TargetTransform | None = None,
        chunk_size: int = 0,
    ) -> Tensor:
        """Mean loss over counted positions.

        Args:
            logits: ``(N, V)`` student logits (any float dtype; computed in fp32).
            target: ``N`` rows of sparse teacher targets.
            mask: ``(N,)`` bool positions that count (``None`` = all).
            transform: temperatures / weights (``None`` = static tau 1).
            chunk_size: positions per chunk; ``0`` = one chunk. With gradients on, each chunk is
                activation-checkpointed, so only the logits are kept between forward and backward.

        Returns:
            Scalar loss; a batch where nothing counts gives 0 that is still connected to ``logits``.
        """
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {chunk_size}")
        if logits.dim() != 2 or logits.shape[0] != target.ids.shape[0]:
            raise ValueError(f"logits {tuple(logits.shape)} must be (N, V) with N = {target.ids.shape[0]} target rows")
        if mask is not None and mask.shape != logits.shape[:1]:
            raise ValueError(f"mask must be ({logits.shape[0]},) like the logits' rows, got {tuple(mask.shape)}")
        counted = self.counted(target, mask)  # (N,)
        context = None if transform is None else transform.batch_context(target, counted)
        n = logits.shape[0]
        step = chunk_size if chunk_size > 0 else max(n, 1)
        checkpointed = chunk_size > 0 and torch.is_grad_enabled() and logits.requires_grad
        total = upcast(logits).new_zeros(())
        for start in range(0, max(n, 1), step):
            rows = slice(start, start + step)
            fn = partial(self._chunk_sum, target=target.select(rows), counted=counted[rows])
            if checkpointed:
                part = checkpoint(fn, logits[rows], transform=transform, context=context, use_reentrant=False)
            else:
                part = fn(logits[rows], transform=transform, context=context)
            total = total + part
        return total / counted.sum().clamp(min=1)


class NLL(DistillLoss):
    """Soft cross-entropy ``-sum_k F_k log q_k`` (the paper's NLL, Table 5).

    Equals ``KLD`` plus the teacher's entropy, so the student gradients of the two are the same.
    """

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return -t_logp.exp() * s_logp


class KLD(DistillLoss):
    """Forward KL ``KL(F || P_S) = sum_k F_k (log F_k - log q_k)`` (the paper's KLD, Table 5; [D] direction).

    Without the tail bucket ``q`` is the student's full-vocabulary probability, so the loss is >= -log sum_k q_k
    >= 0 and is 0 only when the student matches ``F`` and puts no mass outside the kept set.
    """

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return t_logp.exp() * (t_logp - s_logp)


class MSE(DistillLoss):
    """Squared error summed over the kept entries: ``sum_k (F_k - q_k)^2`` (the paper's MSE, Table 5).

    Args:
        log_space: [D] compare log-probabilities instead, ``sum_k (log F_k - log q_k)^2``. The paper does not say
            which; probabilities over the kept set are the default. The sum over entries (not a mean) is also a
            [D] choice: it is the squared L2 distance between the two vectors.
        tail_bucket: see ``DistillLoss``.
        hinton: see ``DistillLoss``.
    """

    def __init__(self, log_space: bool = False, tail_bucket: bool = False, hinton: bool = False) -> None:
        super().__init__(tail_bucket=tail_bucket, hinton=hinton)
        self.log_space = log_space

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        if self.log_space:
            return (t_logp - s_logp) ** 2
        return (t_logp.exp() - s_logp.exp()) ** 2


class ReverseKL(DistillLoss):
    """Reverse KL ``KL(P_S || F)``, in the generalised form for non-negative measures (beyond the paper).

    ``sum_k [q_k (log q_k - log F_k) - q_k + F_k]``. [D] With the tail bucket both sides sum to 1 and this is the
    ordinary reverse KL; without it the student's kept mass is below 1, where the plain formula would reward
    moving mass out of the kept set (its minimum is ``q = F / e``), while the generalised one is >= 0 and is 0
    exactly at ``q = F``.
    """

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        q = s_logp.exp()
        return q * (s_logp - t_logp) - q + t_logp.exp()


class JSD(DistillLoss):
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024; beyond the paper).

    ``JSD_beta = beta * KL(F || M) + (1 - beta) * KL(P_S || M)`` with ``M = beta * F + (1 - beta) * P_S``. The
    linear terms of the generalised KL cancel for the mixture, so the formula needs no correction without the
    tail bucket.

    Args:
        beta: mixture weight in (0, 1); at either end the divergence vanishes identically (use ``KLD`` or
            ``ReverseKL`` for the limits).
        tail_bucket: see ``DistillLoss``.
        hinton: see ``DistillLoss``.
    """

    def __init__(self, beta: float = 0.5, tail_bucket: bool = False, hinton: bool = False) -> None:
        super().__init__(tail_bucket=tail_bucket, hinton=hinton)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must lie in (0, 1), got {beta}")
        self.beta = beta

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        m_logp = torch.logaddexp(t_logp + math.log(self.beta), s_logp + math.log(1.0 - self.beta))  # log M
        return self.beta * t_logp.exp() * (t_logp - m_logp) + (1.0 - self.beta) * s_logp.exp() * (s_logp - m_logp)


class TVD(DistillLoss):
    """Total variation distance ``1/2 sum_k |F_k - q_k|`` (beyond the paper)."""

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        return 0.5 * (t_logp.exp() - s_logp.exp()).abs()


class ULD(DistillLoss):
    """Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit
    Distillation Loss for LLMs", arXiv 2402.12030, eq. 3): the L1 distance between the student's and the teacher's
    probability vectors, each sorted in descending order and zero-padded to the same length,

        ULD_i = sum_r | q_(r) - F_(r) |

    (``q_(r)`` the student's r-th largest probability over its full vocabulary, ``F_(r)`` the teacher target's).
    Only ranks are compared, not ids, so the two vocabularies need not match: the vocabulary-free path for a teacher
    with another tokenizer (at the aligned positions of ``pd_lightning.crosstok.align``), and usable with any target.

    With a sparse teacher of ``k_i`` kept entries the teacher vector is 0 beyond rank ``k_i``, so those ranks add the
    student's mass outside its own top ``k_i``: ``ULD_i = sum_{r<=k_i} |q_(r) - F_(r)| + (1 - sum_{r<=k_i} q_(r))``,
    which needs the student's top-``k`` (``torch.topk``) and not a full sort. ``F`` is the kept set renormalised at
    the teacher temperature, as for every loss here.

    Args:
        tail_bucket: [D] the teacher's kept part is ``(1 - tail) F`` and its tail mass (whose shape beyond rank
            ``k_i`` is not stored) is compared as one bucket with the student's mass beyond its top ``k_i``:
            ``|tail - (1 - sum_{r<=k_i} q_(r))|``, the smallest L1 over those ranks that any shape of the tail allows.
        hinton: see ``DistillLoss``.

    [D] The paper sums over positions and averages per sequence; here, like every ``DistillLoss``, the mean over
    counted positions. It reads the student's full distribution (its top-k), so ``lm_kd_loss`` takes its generic
    route (``full_student``).
    """

    full_student = True  # reads the student's top-k, not only the kept ids: the objective's generic route

    def divergence(self, s_logp: Tensor, t_logp: Tensor) -> Tensor:
        """``|q_(r) - F_(r)|`` per rank, for rank-aligned (sorted) log-probabilities."""
        return (t_logp.exp() - s_logp.exp()).abs()

    def kept_losses(self, s_logp, target, counted, temps, s_tail=None) -> Tensor:  # noqa: D102
        raise NotImplementedError("ULD compares sorted distributions: it needs the student's logits (token_losses)")

    def token_losses(
        self,
        logits: Tensor,
        target: SparseTarget,
        counted: Tensor,
        transform: TargetTransform | None = None,
        context: Tensor | None = None,
        student_logp: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        logits = upcast(logits)  # (n, V)
        dtype = logits.dtype
        temps = self.temperatures(logits, target, counted, transform, context)
        if temps.student is None:
            s_full = student_logp if student_logp is not None else F.log_softmax(logits, dim=-1)  # (n, V)
        else:
            s_full = F.log_softmax(logits / temps.student[:, None], dim=-1)  # (n, V)
        n, vocab = logits.shape
        k = target.ids.shape[1]
        s_top = s_full.topk(min(k, vocab), dim=-1).values  # (n, min(K, V)) sorted descending
        if k > vocab:  # more kept entries than student ids (a teacher with a larger vocabulary): zero-padded ranks
            s_top = torch.cat([s_top, s_top.new_full((n, k - vocab), float("-inf"))], dim=-1)
        t_raw = target.logprobs.to(dtype).sort(dim=-1, descending=True).values  # (n, K), padding (-inf) last
        valid = torch.isfinite(t_raw) & counted[:, None]  # (n, K): the first k_i ranks of a counted row
        t_logp = torch.log_softmax(t_raw / temps.teacher[:, None], dim=-1)  # (n, K); NaN on empty rows (masked)
        if self.tail_bucket:
            if target.tail is not None:
                tail = target.tail.to(dtype).clamp(0.0, 1.0)  # (n,)
            else:
                tail = (1.0 - torch.where(torch.isfinite(t_raw), t_raw.exp(), 0.0).sum(-1)).clamp(0.0, 1.0)
            t_logp = t_logp + torch.log1p(-tail)[:, None]  # (1 - tail) F
        q_top = torch.where(valid, s_top, float("-inf")).exp()  # (n, K) student's top-k_i probabilities, 0 beyond
        ranks = torch.where(valid, self.divergence(torch.where(valid, s_top, 0.0), torch.where(valid, t_logp, 0.0)),
                            0.0).sum(-1)  # fmt: skip
        s_rest = (1.0 - q_top.sum(-1)).clamp(min=0.0)  # (n,) student mass beyond its top k_i
        rest = (tail - s_rest).abs() if self.tail_bucket else s_rest
        per_token = torch.where(counted, ranks + rest, 0.0)
        if temps.weight is not None:
            per_token = per_token * temps.weight
        return per_token, temps.teacher.detach()
