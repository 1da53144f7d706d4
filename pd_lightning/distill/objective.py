"""The training objective ``L = (1 - alpha) L_lm + alpha L_kd`` from the student's last hidden states (METHOD.md).

``lm_kd_loss`` is the one seam the LightningModule calls. Two paths give the same numbers:

- ``fused=False``: materialise ``logits = hidden @ weight.T`` ``(N, V)`` and let autograd do the rest.
- ``fused=True``: a ``torch.autograd.Function`` walks over chunks of positions and, in its forward, computes each
  chunk's logits, its LM and KD losses and the gradient of the total loss with respect to the chunk's logits; it
  turns that into the chunk's rows of ``d hidden`` and accumulates ``d weight`` (the fused-linear-loss idea of
  Liger-Kernel's ``fused_linear_cross_entropy`` / ``fused_linear_distillation``, written anew here). Neither the
  ``(N, V)`` logits nor their gradient ever exist; the backward only scales the stored gradients by the incoming
  scalar. Each chunk takes one of two routes to its logit gradient:

  - sparse (student at tau 1 and no tail bucket -- the paper's setting, static tau or WTTM / AdaKD on the teacher):
    the losses see the student only through ``log q`` at the label and the kept ids, so autograd runs on those
    ``(n, K + 1)`` values and the dense gradient ``scatter(g) - softmax * sum(g)`` is written over the logits buffer
    in place. Peak extra memory: ``d weight`` + ``d hidden`` + one ``(chunk, V)`` fp32 buffer. [D] The transform's
    teacher temperature and weight are taken as constants w.r.t. the student here (true of every transform in
    ``temperature.py``; only a student temperature depends on the student, and it takes the generic route).
  - generic (a student temperature -- NormKD, ``hinton`` --, the tail bucket, or a loss that reads the student's
    whole distribution, ``DistillLoss.full_student``: ULD): autograd through the chunk's ``(chunk, V)`` computation,
    a few ``(chunk, V)`` buffers.

  On CPU (2 cores, 2,048 tokens, V = 151,552, H = 512) the fused path takes ~0.10x the naive peak memory at
  ~1.1-1.2x its time (``benchmarks/loss_memory.py``): the matmuls on 83-row chunks run below BLAS's large-matrix
  rate. It is the default because the naive path's ``(N, V)`` buffers do not fit at training sizes.

[D] choices:

- KD positions are the LM positions (``labels != -100``) that have a non-empty teacher target, so document
  boundaries and padding masked out of the LM loss are masked out of the KD loss too.
- ``lm`` and ``kd`` in ``LossOutput`` are detached values for logging; only ``total`` carries gradient (the
  fused path computes the gradient of ``total`` alone).
- ``teacher_student_kl`` is a logged diagnostic, computed under ``no_grad``:
  ``mean_i sum_k F1_ik (log F1_ik - log q_ik)`` with ``F1`` the teacher's kept set renormalised at tau 1 and ``q``
  the student's plain full-vocabulary softmax at the kept ids -- i.e. ``KLD`` at tau 1 without tail bucket, whatever
  the training loss and temperature are. It is >= 0, and 0 only when the student matches the kept set and puts no
  mass elsewhere.
- When ``alpha == 0`` or ``target is None`` the KD term is skipped entirely: ``total`` is the LM loss itself,
  bit-for-bit the LM-only computation (same chunking, no teacher-dependent work).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from pd_lightning.distill.losses import KLD, DistillLoss, upcast
from pd_lightning.distill.target import SparseTarget
from pd_lightning.distill.temperature import TargetTransform, Temperatures

IGNORE_INDEX = -100
# Automatic chunk: one fp32 (chunk, V) buffer of about 48 MiB (83 positions at V = 151,552). The fused path's peak
# is d weight + d hidden + this buffer; larger chunks run the three matmuls faster (CPU BLAS reaches ~60-85% of its
# large-matrix rate at 83 rows), smaller ones keep the peak closer to the unavoidable d weight.
CHUNK_BYTES = 48 * 2**20

_DIAGNOSTIC = KLD()  # teacher_student_kl: forward KL at tau 1, no tail bucket
# (rows, (n, V) fp32 logits) -> None; see lm_kd_loss's ``observe``
Observer = Callable[[slice, Tensor], None]


@dataclass
class LossOutput:
    """What ``lm_kd_loss`` returns.

    Attributes:
        total: scalar ``(1 - alpha) * lm + alpha * kd`` (``lm`` itself when KD is skipped); the only one with grad.
        lm: detached mean cross-entropy over positions with ``labels != -100``.
        kd: detached mean KD loss over KD positions, or ``None`` when KD is skipped.
        mean_temperature: mean teacher temperature over KD positions, or ``None`` when KD is skipped.
        teacher_student_kl: mean forward KL diagnostic (module docstring), or ``None`` when KD is skipped.
    """

    total: Tensor
    lm: Tensor
    kd: Tensor | None
    mean_temperature: Tensor | None
    teacher_student_kl: Tensor | None


@dataclass
class _KD:
    """Everything the chunk loop needs for the KD term (built once per batch)."""

    target: SparseTarget
    counted: Tensor  # (N,) bool KD positions
    loss: DistillLoss
    transform: TargetTransform | None
    context: Tensor | None
    alpha: float


def auto_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one fp32 ``(chunk, V)`` tensor is about ``CHUNK_BYTES``."""
    return max(1, CHUNK_BYTES // (4 * vocab_size))


class _Chunk(NamedTuple):
    """What one chunk of the fused loop yields (sums over the chunk's positions)."""

    d_logits: Tensor | None  # (n, V) gradient of the total loss w.r.t. the chunk's logits
    lm_sum: Tensor
    kd_sum: Tensor | None
    tau_sum: Tensor | None
    kl_sum: Tensor | None


def _generic_chunk(
    logits: Tensor, labels: Tensor, kd: _KD | None, rows: slice, scale_lm: Tensor, scale_kd: Tensor | None, grad: bool
) -> _Chunk:
    """Any loss / transform: autograd through the chunk's ``(n, V)`` computation (a few ``(n, V)`` buffers)."""
    logits = logits.requires_grad_(grad)  # (n, V) leaf of this chunk's graph
    with torch.enable_grad():
        logp = F.log_softmax(logits, dim=-1)  # (n, V), shared by the LM loss, the KD loss (at tau_s 1) and the log
        lm_sum = F.nll_loss(logp, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        obj = scale_lm * lm_sum
        if kd is not None:
            target, counted = kd.target.select(rows), kd.counted[rows]
            kd_tok, tau = kd.loss.token_losses(logits, target, counted, kd.transform, kd.context, student_logp=logp)
            kd_sum = kd_tok.sum()
            obj = obj + scale_kd * kd_sum
        d_logits = torch.autograd.grad(obj, logits)[0] if grad else None
    if kd is None:
        return _Chunk(d_logits, lm_sum.detach(), None, None, None)
    with torch.no_grad():
        logp = logp.detach()
        kl_sum = _DIAGNOSTIC.token_losses(logp, target, counted, student_logp=logp)[0].sum()
    return _Chunk(d_logits, lm_sum.detach(), kd_sum.detach(), torch.where(counted, tau, 0.0).sum(), kl_sum)


def _sparse_chunk(
    logits: Tensor,
    labels: Tensor,
    kd: _KD | None,
    temps: Temperatures | None,
    rows: slice,
    scale_lm: Tensor,
    scale_kd: Tensor | None,
    grad: bool,
) -> _Chunk:
    """Student at tau 1, no tail bucket: the loss sees ``log q`` only at the label and the kept ids.

    With ``g_ij = log q(id_ij) = z(id_ij) - lse_i`` the chain rule through the log-softmax gives
    ``dL/dz_iv = sum_j dL/dg_ij [v = id_ij] - softmax_iv * sum_j dL/dg_ij``: autograd runs on the ``(n, K + 1)``
    gathered values only, and the dense gradient is written over the logits buffer in place (softmax, scale,
    scatter), so the chunk needs one ``(n, V)`` buffer in all.
    """
    safe_labels = labels.clamp(min=0)[:, None]  # (n, 1); -100 -> 0, masked below
    z_lm = logits.gather(1, safe_labels)  # (n, 1)
    z_kd = None if kd is None else logits.gather(1, kd.target.ids[rows])  # (n, K)
    z = logits  # (n, V) work buffer, overwritten in place from here on
    zmax = z.amax(-1, keepdim=True)  # (n, 1)
    z.sub_(zmax).exp_()  # exp(z - max)
    norm = z.sum(-1, keepdim=True)  # (n, 1)
    lse = zmax + norm.log()  # (n, 1)
    g_lm = (z_lm - lse).requires_grad_(grad)  # (n, 1) log q at the labels
    g_kd = None if kd is None else (z_kd - lse).requires_grad_(grad)  # (n, K) log q at the kept ids
    with torch.enable_grad():
        lm_sum = -torch.where(labels[:, None] != IGNORE_INDEX, g_lm, 0.0).sum()
        obj = scale_lm * lm_sum
        if kd is not None:
            target, counted = kd.target.select(rows), kd.counted[rows]
            kd_sum = kd.loss.kept_losses(g_kd, target, counted, temps).sum()
            obj = obj + scale_kd * kd_sum
        leaves = [g_lm] if kd is None else [g_lm, g_kd]
        grads = torch.autograd.grad(obj, leaves) if grad else None
    d_logits = None
    if grads is not None:
        row_sum = sum(g.sum(-1, keepdim=True) for g in grads)  # (n, 1)
        d_logits = z.mul_(-row_sum / norm)  # -softmax * row_sum
        d_logits.scatter_add_(1, safe_labels, grads[0])  # ignored labels have zero gradient
        if kd is not None:
            d_logits.scatter_add_(1, kd.target.ids[rows], grads[1])  # padding entries have zero gradient
    if kd is None:
        return _Chunk(d_logits, lm_sum.detach(), None, None, None)
    with torch.no_grad():
        ones = Temperatures(teacher=torch.ones_like(temps.teacher))
        kl_sum = _DIAGNOSTIC.kept_losses(g_kd.detach(), target, counted, ones).sum()
    return _Chunk(d_logits, lm_sum.detach(), kd_sum.detach(), torch.where(counted, temps.teacher, 0.0).sum(), kl_sum)


def _fused_loop(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    kd: _KD | None,
    chunk_size: int,
    grad_hidden: bool,
    grad_weight: bool,
    observe: Observer | None = None,
) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    """Chunk loop of the fused path: ``[lm, kd, mean_tau, kl]`` means and the gradients of ``total``.

    The three matmuls per chunk (logits, ``d hidden``, ``d weight``) run in ``mm_dtype``: the autocast dtype when
    autocast is on for the tensors' device (bf16-mixed: bf16 operands, tensor cores, fp32 accumulation inside the
    matmul), else the inputs' dtype. The logits are upcast into an fp32 (fp64 for fp64 inputs) buffer, the losses
    and logit gradients are computed there with autocast off, and ``d weight`` is summed over chunks in fp32. Under
    bf16 autocast this equals the unfused autocast path in loss and ``d hidden`` and is within 4.2e-3 x max|g| in
    ``d weight`` (``tests/test_objective.py::test_fused_head_runs_in_the_autocast_dtype``).
    """
    n = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    device_type = hidden.device.type
    autocast = hidden.dtype != torch.float64 and torch.is_autocast_enabled(device_type)
    mm_dtype = torch.get_autocast_dtype(device_type) if autocast else hidden.dtype
    w_mm = weight.detach().to(mm_dtype)  # (V, H), one cast per batch (none without autocast)
    n_lm = (labels != IGNORE_INDEX).sum().clamp(min=1)
    n_kd = None if kd is None else kd.counted.sum().clamp(min=1)
    scale_lm = (1.0 / n_lm) if kd is None else (1.0 - kd.alpha) / n_lm
    scale_kd = None if kd is None else kd.alpha / n_kd
    sums = [torch.zeros((), dtype=acc, device=hidden.device) for _ in range(4)]  # lm, kd, tau, kl
    d_hidden = torch.empty_like(hidden) if grad_hidden else None  # (N, H)
    alloc = torch.empty if n > 0 else torch.zeros  # the first chunk writes d weight (no zero-fill pass)
    d_weight = alloc(weight.shape, dtype=acc, device=weight.device) if grad_weight else None  # (V, H)
    grad = grad_hidden or grad_weight
    step = chunk_size if chunk_size > 0 else auto_chunk_size(weight.shape[0])
    vocab = weight.shape[0]
    # One logits buffer for all chunks: a fresh 50 MB tensor per chunk would be new pages for the OS to fault in
    # and zero every time (several % of the run time on CPU).
    buffer = torch.empty(min(step, n) * vocab, dtype=acc, device=hidden.device)
    for start in range(0, n, step):
        rows = slice(start, start + step)
        h = hidden[rows].to(mm_dtype)  # (n, H)
        logits = buffer[: h.shape[0] * vocab].view(h.shape[0], vocab)  # (n, V)
        if mm_dtype == acc:
            torch.mm(h, w_mm.T, out=logits)
        else:
            logits.copy_(h @ w_mm.T)  # low-precision matmul (fp32 accumulation inside), as the unfused path
        if observe is not None:  # read-only look at this chunk's logits, before the losses overwrite the buffer
            with torch.no_grad():
                observe(rows, logits)
        with torch.autocast(device_type, enabled=False):  # the losses in fp32 / fp64
            temps = None
            if kd is not None:
                target, counted = kd.target.select(rows), kd.counted[rows]
                temps = kd.loss.temperatures(logits, target, counted, kd.transform, kd.context)
            if kd is None or (temps.student is None and not kd.loss.tail_bucket and not kd.loss.full_student):
                chunk = _sparse_chunk(logits, labels[rows], kd, temps, rows, scale_lm, scale_kd, grad)
            else:
                chunk = _generic_chunk(logits, labels[rows], kd, rows, scale_lm, scale_kd, grad)
        sums[0] += chunk.lm_sum
        if kd is not None:
            sums[1] += chunk.kd_sum
            sums[2] += chunk.tau_sum
            sums[3] += chunk.kl_sum
        if not grad:
            continue
        d_logits = chunk.d_logits.to(mm_dtype)  # (n, V)
        del chunk
        if d_hidden is not None:
            if mm_dtype == hidden.dtype:
                torch.mm(d_logits, w_mm, out=d_hidden[rows])  # (n, H)
            else:
                d_hidden[rows] = d_logits @ w_mm  # low-precision matmul, stored in hidden's dtype
        if d_weight is not None:
            if d_logits.dtype != acc:  # low-precision matmul, fp32 accumulation
                part = (d_logits.T @ h).to(acc)
                if start == 0:
                    d_weight.copy_(part)
                else:
                    d_weight.add_(part)
            elif start == 0:
                torch.mm(d_logits.T, h, out=d_weight)  # (V, H) = (V, n) @ (n, H)
            else:
                d_weight.addmm_(d_logits.T, h)  # (V, H) += (V, n) @ (n, H)
        del d_logits
    means = [sums[0] / n_lm]
    if kd is not None:
        means += [sums[1] / n_kd, sums[2] / n_kd, sums[3] / n_kd]
    return means, d_hidden, None if d_weight is None else d_weight.to(weight.dtype)


class _GatherHead(torch.autograd.Function):
    """A sharded output head (a DTensor, e.g. FSDP2's shard of ``lm_head.weight``) -> its full ``(V, H)`` tensor.

    Forward: an all-gather (``full_tensor``). Backward: the full ``(V, H)`` gradient of this rank's loss, divided by
    the mesh size and reduce-scattered back to the head's placements -- the gradient of the mean over ranks of their
    losses, which is what FSDP does for the weights it gathers itself (``reduce_scatter`` with averaging). DTensor's
    own ``full_tensor`` backward would instead keep only this rank's slice of this rank's gradient (no reduction).
    """

    @staticmethod
    def forward(ctx, weight):  # type: ignore[override]
        ctx.mesh, ctx.placements = weight.device_mesh, weight.placements
        return weight.full_tensor()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        from torch.distributed.tensor import DTensor, Partial

        summed = [Partial("sum")] * ctx.mesh.ndim
        grad = DTensor.from_local(grad.contiguous() / ctx.mesh.size(), ctx.mesh, summed, run_check=False)
        return grad.redistribute(ctx.mesh, ctx.placements)


def full_head(weight: Tensor) -> Tensor:
    """``weight`` itself, or the full tensor of a sharded (DTensor) head with gradients flowing back to its shards
    (``_GatherHead``). Lets ``lm_kd_loss`` run when the head is sharded at loss time (FSDP2 with the head in its own
    ``fully_shard`` unit, whose forward the fused loss never calls)."""
    if weight.__class__.__name__ != "DTensor":  # no torch.distributed import on the common path
        return weight
    return _GatherHead.apply(weight) if torch.is_grad_enabled() and weight.requires_grad else weight.full_tensor()


class _FusedLinearLMKD(torch.autograd.Function):
    """``(hidden, weight) -> (total, lm, kd, mean_tau, kl)``; gradients computed in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, kd: _KD | None, chunk_size: int, observe=None):  # type: ignore[override]
        means, d_hidden, d_weight = _fused_loop(
            hidden, weight, labels, kd, chunk_size, ctx.needs_input_grad[0], ctx.needs_input_grad[1], observe
        )
        total = means[0] if kd is None else (1.0 - kd.alpha) * means[0] + kd.alpha * means[1]
        ctx.save_for_backward(d_hidden, d_weight)
        outputs = [total] + [m.clone() for m in means]  # clones: total may be means[0] itself
        ctx.mark_non_differentiable(*outputs[1:])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, grad_total: Tensor, *unused: Tensor):  # type: ignore[override]
        d_hidden, d_weight = ctx.saved_tensors
        if not bool(grad_total == 1.0):  # scaled losses (e.g. AMP, accumulation): the only allocation here
            d_hidden = None if d_hidden is None else d_hidden * grad_total.to(d_hidden.dtype)
            d_weight = None if d_weight is None else d_weight * grad_total.to(d_weight.dtype)
        return d_hidden, d_weight, None, None, None, None


def lm_kd_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    target: SparseTarget | None,
    alpha: float,
    loss: DistillLoss | None,
    temperature: TargetTransform | None = None,
    chunk_size: int = 0,
    fused: bool = True,
    observe: Observer | None = None,
) -> LossOutput:
    """``(1 - alpha) * L_lm + alpha * L_kd`` from the last hidden states and the output head (METHOD.md, Objective).

    Args:
        hidden: ``(N, H)`` student hidden states after the final norm (any float dtype).
        weight: ``(V, H)`` output head (``lm_head.weight``); a sharded DTensor head (FSDP2) is gathered once per call
            and its gradient reduce-scattered back (``full_head``).
        labels: ``(N,)`` int64 next-token ids, ``-100`` = ignored.
        target: ``N`` rows of sparse teacher targets, or ``None`` when the data carries none.
        alpha: KD weight in [0, 1] (from the ``AlphaScheduler``).
        loss: the KD divergence; needed when ``alpha > 0``.
        temperature: per-token temperatures / weights; ``None`` = static tau 1.
        chunk_size: positions per chunk on the fused path; 0 = automatic (``auto_chunk_size``).
        fused: chunked fused path (never materialises the ``(N, V)`` logits) instead of plain autograd.
        observe: called as ``observe(rows, logits)`` under ``no_grad`` with the fp32 (fp64 for fp64 inputs) logits
            of the positions ``rows`` (a slice of the ``N`` rows), chunk by chunk on the fused path and once for all
            rows on the unfused one, before the losses use them; it must not modify them. This is how the online
            logit recorder and co-training read the training-time logits from the same pass (``pd_lightning.online``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = automatic), got {chunk_size}")
    if alpha > 0 and target is None:
        raise ValueError(
            f"alpha={alpha} > 0 asks for a KD loss, but the data provides no teacher targets: use a data module with "
            "a teacher-logit cache (or an online teacher), or set alpha to 0"
        )
    if alpha > 0 and loss is None:
        raise ValueError(f"alpha={alpha} > 0 needs a KD loss, but loss is None")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (N, H), weight (V, H), labels (N,); got {tuple(hidden.shape)}, {tuple(weight.shape)}, "
            f"{tuple(labels.shape)}"
        )
    weight = full_head(weight)  # a sharded head is gathered once per call; its gradient reduce-scattered back
    kd = None
    if alpha > 0:
        if target.ids.shape[0] != hidden.shape[0]:
            raise ValueError(f"target has {target.ids.shape[0]} rows, hidden has {hidden.shape[0]}")
        counted = loss.counted(target, labels != IGNORE_INDEX)  # (N,)
        context = None if temperature is None else temperature.batch_context(target, counted)
        kd = _KD(target, counted, loss, temperature, context, alpha)

    if fused:
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            total, lm, *rest = _FusedLinearLMKD.apply(hidden, weight, labels, kd, chunk_size, observe)
        else:  # evaluation: same loop, no gradients
            means, _, _ = _fused_loop(hidden, weight, labels, kd, chunk_size, False, False, observe)
            lm, rest = means[0], means[1:]
            total = lm if kd is None else (1.0 - alpha) * lm + alpha * rest[0]
        if kd is None:
            return LossOutput(total, lm, None, None, None)
        return LossOutput(total, lm, *rest)

    logits = upcast(hidden @ weight.T)  # (N, V)
    if observe is not None:
        with torch.no_grad():
            observe(slice(0, logits.shape[0]), logits.detach())
    logp = F.log_softmax(logits, dim=-1)  # (N, V)
    n_lm = (labels != IGNORE_INDEX).sum().clamp(min=1)
    lm = F.nll_loss(logp, labels, ignore_index=IGNORE_INDEX, reduction="sum") / n_lm
    if kd is None:
        return LossOutput(lm, lm.detach(), None, None, None)
    kd_tok, tau = loss.token_losses(logits, target, counted, temperature, kd.context, student_logp=logp)
    n_kd = counted.sum().clamp(min=1)
    kd_mean = kd_tok.sum() / n_kd
    total = (1.0 - alpha) * lm + alpha * kd_mean
    mean_tau = torch.where(counted, tau, 0.0).sum() / n_kd
    with torch.no_grad():
        logp = logp.detach()
        kl = _DIAGNOSTIC.token_losses(logp, target, counted, student_logp=logp)[0].sum() / n_kd
    return LossOutput(total, lm.detach(), kd_mean.detach(), mean_tau, kl)
