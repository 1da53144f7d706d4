"""Logits processors: a teacher's full logits -> the sparse target that is cached or fed to the loss online.

Every processor computes, from the *full* logits and in fp32, the teacher's log-probabilities at temperature 1,
the standard deviation of the raw logits and the entropy of the distribution (the per-token statistics the
adaptive temperatures need, see METHOD.md), then keeps a subset of entries (``select``). Variants:

- ``TopPK``: the paper's top-p-k truncation (kept values are true log-probabilities, ``1 - sum p`` is the tail).
- ``Sampled``: Random-Sampling KD (Anshumann et al., arXiv 2503.16870), an unbiased sparse estimate.
- ``Full``: every vocabulary entry (small vocabularies only).

Rows are processed in chunks so that the fp32/fp64 temporaries stay bounded whatever the batch size.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pd_lightning.distill.target import SparseTarget

DEFAULT_NLOGP_MAX = math.log(1e6)  # cached -log p range of truncating processors: p >= 1e-6

# Upper bound on elements per row chunk of the fp32 temporaries (2^27 x 4 B = 512 MiB).
_CHUNK_ELEMENTS = 2**27


def position_keys(sequence_indices: Tensor, seq_len: int) -> Tensor:
    """Per-position keys for ``Sampled``: ``sequence_index * seq_len + t``, flattened to ``(B * seq_len,)``.

    Args:
        sequence_indices: ``(B,)`` global sequence indices of a batch.
        seq_len: number of predicted positions per sequence.
    """
    t = torch.arange(seq_len, device=sequence_indices.device, dtype=torch.int64)
    return (sequence_indices.to(torch.int64)[:, None] * seq_len + t[None, :]).reshape(-1)


class LogitsProcessor(ABC):
    """Turns full teacher logits into a :class:`SparseTarget`; subclasses implement only :meth:`select`.

    Non-finite logits (NaN, +-Inf) are refused with a ``ValueError`` that names the first bad row, so that a
    caller can translate the row into a sequence and position.
    """

    #: whether the kept values are the teacher's true log-probabilities (then the tail mass is what they leave out);
    #: ``False`` for estimators whose weights sum to 1 by construction (``Sampled``: tail 0).
    true_probabilities: bool = True

    def nlogp_max(self, vocab_size: int) -> float:
        """Range ``[0, nlogp_max]`` of ``-log p`` the cache stores (smaller probabilities are clamped up).

        Default ``ln 1e6``: a truncation keeps the head of the distribution, where ``p < 1e-6`` is rare and its
        clamping adds at most ``K * 1e-6`` of mass.
        """
        return DEFAULT_NLOGP_MAX

    def __call__(self, logits: Tensor, keys: Tensor | None = None, gammas: tuple[float, ...] = ()) -> SparseTarget:
        """Process logits of any float dtype.

        Args:
            logits: ``(..., V)`` raw teacher logits; leading dims are flattened to ``N`` rows.
            keys: ``(N,)`` int64 identifiers of the rows (e.g. :func:`position_keys`); only stochastic
                processors use them, to draw reproducible random numbers per position. Default ``arange(N)``.
            gammas: powers for which ``U_gamma = sum_v p_v^gamma`` over the full vocabulary is computed
                (``target.power_sums``; WTTM's per-token weight).
        """
        vocab = logits.shape[-1]
        flat = logits.reshape(-1, vocab)  # (N, V)
        n = flat.shape[0]
        if keys is None:
            keys = torch.arange(n, device=flat.device, dtype=torch.int64)
        elif keys.shape != (n,):
            raise ValueError(f"keys must have shape ({n},) (one per row), got {tuple(keys.shape)}")
        gammas = tuple(float(g) for g in gammas)
        rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
        parts: list[tuple[Tensor, ...]] = []
        for start in range(0, max(n, 1), rows):  # one (possibly empty) chunk at least
            z = flat[start : start + rows].float()  # (n_c, V)
            logprobs = F.log_softmax(z, dim=-1)  # (n_c, V)
            # (n_c,) unbiased std (correction=1), as torch.std in NormKD's code
            std = z.std(dim=-1) if z.shape[0] and vocab > 1 else z.new_zeros(z.shape[0])
            # Any NaN/+-Inf logit makes its row's std NaN, so the std doubles as the finiteness check (a separate
            # isfinite pass over (n_c, V) cost ~18% of the processing); rows it flags are confirmed exactly.
            suspect = ~torch.isfinite(std) if vocab > 1 else torch.ones_like(std, dtype=torch.bool)
            if bool(suspect.any()):
                bad = suspect.nonzero()[:, 0]
                bad = bad[~torch.isfinite(z[bad]).all(-1)]
                if bad.numel():
                    row = start + int(bad[0])
                    raise ValueError(f"teacher logits contain NaN/Inf at row {row} (of {n} rows, vocab {vocab})")
            p = logprobs.exp()  # (n_c, V)
            entropy = -(p * logprobs).sum(-1)  # (n_c,) nats
            sums = torch.stack([(logprobs * g).exp().sum(-1) for g in gammas], -1) if gammas else None  # (n_c, G)
            ids, values = self.select(logprobs, keys[start : start + rows])  # (n_c, K_c) each
            if self.true_probabilities:
                # tail = mass of the ids not kept, summed directly (no 1 - sum cancellation); padding adds 0
                kept = torch.zeros_like(p, dtype=torch.int8).scatter_add_(1, ids, torch.isfinite(values).to(torch.int8))
                tail = torch.where(kept.bool(), 0.0, p).sum(-1)  # (n_c,)
            else:
                tail = torch.zeros_like(std)
            parts.append((ids, values, std, entropy, tail, sums))
        width = max(p[0].shape[1] for p in parts)
        ids = torch.cat([_pad(p[0], width, 0) for p in parts])  # (N, K)
        values = torch.cat([_pad(p[1], width, -math.inf) for p in parts])  # (N, K)
        std, entropy, tail = (torch.cat([p[i] for p in parts]) for i in (2, 3, 4))
        power_sums = None
        if gammas:
            stacked = torch.cat([p[5] for p in parts])  # (N, G)
            power_sums = {g: stacked[:, i] for i, g in enumerate(gammas)}
        return SparseTarget(ids=ids, logprobs=values, std=std, entropy=entropy, tail=tail, power_sums=power_sums)

    @abstractmethod
    def select(self, logprobs: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Choose the kept entries of each row.

        Args:
            logprobs: ``(n, V)`` fp32 log-probabilities of the full teacher distribution at temperature 1.
            keys: ``(n,)`` int64 row identifiers (see ``__call__``).

        Returns:
            ``ids`` ``(n, K)`` int64 (padding 0) and ``values`` ``(n, K)`` fp32 (padding ``-inf``).
        """

    @abstractmethod
    def max_entries(self, vocab_size: int) -> int | None:
        """The fixed number ``K`` of entries per row for this vocabulary, or ``None`` when it varies per batch."""

    def hparams(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` of this processor (stored as JSON in cache metadata)."""
        args = {
            name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters if name != "self"
        }
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams()["init_args"].items())
        return f"{type(self).__name__}({args})"


def _pad(x: Tensor, width: int, value: float) -> Tensor:
    """Right-pad ``(n, K)`` to ``(n, width)`` with ``value``."""
    if x.shape[1] == width:
        return x
    return F.pad(x, (0, width - x.shape[1]), value=value)


class TopPK(LogitsProcessor):
    """Top-p-k truncation: keep the ``min(|nucleus_p|, k)`` most probable tokens (METHOD.md, "top-p-k").

    The nucleus is the smallest prefix of the probabilities sorted in decreasing order whose cumulative sum
    (computed in fp64) is ``>= p``. Kept values are the log-probabilities under the full softmax at
    temperature 1, so ``1 - sum(exp(values))`` is the tail mass. ``p=1.0`` keeps exactly ``min(k, V)`` tokens
    (top-k); ``k=None`` means no limit (top-p only, "top-p-inf"), and the output is padded to the largest
    number kept in the batch. Ties between equal probabilities are broken by ``torch.topk``/``sort`` order.

    Args:
        p: nucleus mass in ``(0, 1]``.
        k: maximum number of kept tokens (``>= 1``), or ``None`` for no limit.
    """

    def __init__(self, p: float = 0.95, k: int | None = 100) -> None:
        if not (0.0 < p <= 1.0) or math.isnan(p):
            raise ValueError(f"TopPK: p must be in (0, 1], got p={p}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"TopPK: k must be an integer >= 1 or None (no limit), got k={k!r}")
        self.p = float(p)
        self.k = k

    def max_entries(self, vocab_size: int) -> int | None:
        return None if self.k is None else min(self.k, vocab_size)

    def select(self, logprobs: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        vocab = logprobs.shape[-1]
        if self.k is None or self.k >= vocab:
            values, ids = logprobs.sort(dim=-1, descending=True)  # (n, V)
        else:
            values, ids = logprobs.topk(self.k, dim=-1)  # (n, k), sorted descending
        if self.p >= 1.0:
            return ids, values
        probs = values.double().exp()  # (n, K')
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each entry
        # a prefix mask: an entry is in the nucleus iff the mass before it has not yet reached p
        before = torch.cummax(before, dim=-1).values  # guard the monotonicity against rounding
        keep = before < self.p  # (n, K'), first column always True
        counts = keep.sum(-1)  # (n,)
        width = int(counts.max()) if self.k is None and counts.numel() else ids.shape[1]
        ids, values, keep = ids[:, :width], values[:, :width], keep[:, :width]
        return ids.masked_fill(~keep, 0), values.masked_fill(~keep, -math.inf)


class Sampled(LogitsProcessor):
    """Random-Sampling KD target (Anshumann et al. 2025, arXiv 2503.16870): an unbiased sparse estimate.

    Per position, ``n`` tokens are drawn with replacement from a proposal ``q = softmax(z / proposal_temperature)``
    and the unique ids are kept with weights ``w_i = (c_i / n) * (p_i / q_i)`` (``c_i`` = draws of token ``i``).
    With ``proposal_temperature=1`` (the default, the paper's best setting) ``q = p`` and ``w_i = c_i / n``,
    so ``E[w_i] = p_i`` exactly: the sparse target is an unbiased estimate of the full distribution.
    Otherwise the weights are self-normalised to sum to 1 (consistent, bias ``O(1/n)``).

    **The stored values are ``log w_i``, estimator weights, not true log-probabilities**: they sum to 1 per
    position, so the tail mass is 0 by construction and a temperature applied to them is not the teacher's.
    Ids are sorted ascending. Sampling is a counter-based hash of ``(seed, key, draw)``, so the same key
    gives the same draws in any batch, on resume, and independently of batch composition.

    Args:
        n: draws per position (``>= 1``); at most ``n`` unique ids are stored.
        proposal_temperature: temperature (``> 0``) of the proposal distribution.
        seed: seed of the hash-based random numbers.
    """

    true_probabilities = False  # stored tail mass is 0: the weights are the whole estimate

    def __init__(self, n: int = 64, proposal_temperature: float = 1.0, seed: int = 0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"Sampled: n must be an integer >= 1, got n={n!r}")
        if not proposal_temperature > 0 or math.isinf(proposal_temperature):
            raise ValueError(
                f"Sampled: proposal_temperature must be finite and > 0, got proposal_temperature={proposal_temperature}"
            )
        self.n = n
        self.proposal_temperature = float(proposal_temperature)
        self.seed = int(seed)

    def max_entries(self, vocab_size: int) -> int | None:
        return min(self.n, vocab_size)

    def select(self, logprobs: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        rows, vocab = logprobs.shape
        t = self.proposal_temperature
        logq = logprobs if t == 1.0 else F.log_softmax(logprobs / t, dim=-1)  # (n_r, V) proposal
        cdf = torch.cumsum(logq.double().exp(), dim=-1)  # (n_r, V)
        u = uniform_hash(keys, self.n, self.seed) * cdf[:, -1:]  # (n_r, n) in [0, total)
        draws = torch.searchsorted(cdf, u, right=True).clamp_(max=vocab - 1)  # (n_r, n)
        draws, _ = draws.sort(dim=-1)
        new = torch.ones_like(draws, dtype=torch.bool)
        new[:, 1:] = draws[:, 1:] != draws[:, :-1]
        run = new.long().cumsum(-1) - 1  # (n_r, n) index of the unique id each draw belongs to
        counts = torch.zeros(rows, self.n, dtype=torch.float64, device=logprobs.device)
        counts.scatter_add_(1, run, torch.ones_like(counts))
        ids = torch.zeros_like(draws).scatter_(1, run, draws)  # (n_r, n) unique ids, ascending
        valid = counts > 0
        weights = counts / self.n  # (n_r, n)
        if t != 1.0:
            ratio = (logprobs.gather(1, ids) - logq.gather(1, ids)).double().exp()  # p_i / q_i
            weights = weights * ratio
            weights = weights / weights.sum(-1, keepdim=True)
        width = min(self.n, vocab)  # unique ids <= min(n, V): a fixed K
        values = weights.log().float().masked_fill(~valid, -math.inf)
        return ids.masked_fill(~valid, 0)[:, :width], values[:, :width]


class Full(LogitsProcessor):
    """Every vocabulary entry (``K = V``): exact up to the cache's quantisation, for small vocabularies.

    Caching bound: ``-log p`` is stored in 14 bits over ``[0, ln(1e6 * V)]`` (:meth:`nlogp_max`), so probabilities
    below ``1e-6 / V`` are clamped up (adding at most ``1e-6`` of mass in total) and every stored log-probability
    is within ``ln(1e6 * V) / 32766`` of the truth (``7.6e-4`` at ``V = 65,536``, ``5.7e-4`` at ``V = 256``). The
    reader renormalises rows that cover the whole vocabulary, so they sum to 1 (shifting a row by its log-mass
    error, measured <= 2e-4). Measured at ``V = 65,536`` on Zipf-tailed rows (``tests/test_cache_exactness.py``):
    KL(teacher || cached) below ``2e-6`` nats (median below ``1e-6``), top-1 probability within 0.1%.

    Args:
        max_vocab_size: refuse vocabularies larger than this (a 151k-entry row costs ~600 KB in the cache).
    """

    def __init__(self, max_vocab_size: int = 65536) -> None:
        if max_vocab_size < 1:
            raise ValueError(f"Full: max_vocab_size must be >= 1, got max_vocab_size={max_vocab_size}")
        self.max_vocab_size = max_vocab_size

    def max_entries(self, vocab_size: int) -> int | None:
        self._check(vocab_size)
        return vocab_size

    def nlogp_max(self, vocab_size: int) -> float:
        """``ln(1e6 * V)``: clamping below ``1e-6 / V`` adds at most ``1e-6`` of mass over the whole row."""
        return DEFAULT_NLOGP_MAX + math.log(max(vocab_size, 1))

    def select(self, logprobs: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
        rows, vocab = logprobs.shape
        self._check(vocab)
        ids = torch.arange(vocab, device=logprobs.device).expand(rows, vocab)
        return ids, logprobs

    def _check(self, vocab_size: int) -> None:
        if vocab_size > self.max_vocab_size:
            raise ValueError(
                f"Full: vocabulary of {vocab_size} entries exceeds max_vocab_size={self.max_vocab_size}; "
                "use TopPK or Sampled for large vocabularies, or raise max_vocab_size knowingly"
            )


# splitmix64 constants as signed int64 (torch has no uint64 arithmetic); products wrap modulo 2^64.
_GOLDEN = 0x9E3779B97F4A7C15 - 2**64
_MIX1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX2 = 0x94D049BB133111EB - 2**64


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 bit patterns."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def uniform_hash(keys: Tensor, draws: int, seed: int) -> Tensor:
    """``(N, draws)`` fp64 uniforms in ``[0, 1)``: splitmix64 of ``(seed, key, draw)``, a pure function of its inputs.

    Args:
        keys: ``(N,)`` int64 row keys.
        draws: random numbers per row.
        seed: stream seed.
    """
    d = torch.arange(draws, device=keys.device, dtype=torch.int64)
    state = _mix64(torch.tensor(seed, dtype=torch.int64, device=keys.device) + _GOLDEN)
    x = _mix64(keys.to(torch.int64)[:, None] * _GOLDEN + state) + (d[None, :] + 1) * _GOLDEN  # (N, draws)
    return _shr(_mix64(x), 11).double() * 2.0**-53
