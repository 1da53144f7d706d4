"""Teacher targets over the student's vocabulary (issue 20, item 2): map each teacher token to a student token by
its bytes, and a teacher ``SparseTarget`` (over teacher ids) to one over student ids in the cache's entry format.

At an aligned position (``align.py``) the teacher's row gives ``p_T(next teacher token = t | text up to byte b)``.
Rules:

- **Exact match**: teacher token ``t`` and student token ``s`` with the same bytes: ``p_S-target(s) += p_T(t)``
  (the exact-match mapping of cross-tokenizer KD; e.g. the vocabulary-overlap step of ULD's successors and of TRL's
  GOLD trainer). Several teacher tokens with the same bytes (rare: duplicated added tokens) add their probabilities.
- **No exact match**, rule ``"tail"`` (default, [D]): the probability goes into the tail bucket -- the target's
  ``tail`` (the mass outside the kept entries that the cache stores and ``DistillLoss(tail_bucket=True)`` matches
  against the student's mass outside the kept set); without the tail bucket a loss renormalises over the kept
  (matched) entries, as it does for any truncated target.
- **No exact match**, rule ``"prefix"`` ([D], a choice to measure): the probability goes to the longest student
  token that is a proper byte prefix of the teacher token -- the student token the continuation most plausibly starts
  with (a byte-level student always has one: its single-byte tokens). Approximate: the student's own tokenizer may
  start that text with a shorter or a longer token.
- Special tokens (0 bytes) never match by bytes; ``special_pairs`` pairs them explicitly (``{teacher_eos:
  student_eos}``; ``special_pairs_by_content`` pairs the ones with equal text).
- [D] ``std``, ``entropy`` and ``power_sums`` are the teacher's own, over its vocabulary, and are passed through: they
  describe how confident the teacher is at the position, which is what the transforms that read them (NormKD, WTTM,
  AdaKD) use.

Exactness: with the teacher's tokenizer equal to the student's every id maps to itself and ``map_target`` returns its
input unchanged, bit for bit (``tests/test_crosstok_align.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from pd_lightning.crosstok.align import Alignment
from pd_lightning.crosstok.bytes import TokenBytes
from pd_lightning.distill.target import SparseTarget

Rule = Literal["tail", "prefix"]


@dataclass(frozen=True)
class VocabMap:
    """Teacher id -> student id.

    Attributes:
        exact: ``(V_t,)`` int64, the student id with the same bytes (or paired special token), ``-1`` for none.
        prefix: ``(V_t,)`` int64, the longest student token that is a proper byte prefix of the teacher token,
            ``-1`` for none (special tokens, or a student without such a token).
    """

    exact: Tensor
    prefix: Tensor

    @property
    def matched_ids(self) -> float:
        """Share of the teacher's ids with an exact match."""
        return float((self.exact >= 0).float().mean())

    def student_ids(self, rule: Rule) -> Tensor:
        """``(V_t,)`` the student id each teacher id's mass goes to under ``rule`` (-1: the tail)."""
        if rule == "tail":
            return self.exact
        if rule == "prefix":
            return torch.where(self.exact >= 0, self.exact, self.prefix)
        raise ValueError(f"rule must be 'tail' or 'prefix', got {rule!r}")


def special_pairs_by_content(teacher_tok, student_tok) -> dict[int, int]:
    """Teacher special-token id -> student special-token id for the special tokens whose text is equal."""
    theirs = {t.content: i for i, t in student_tok.added_tokens_decoder.items() if t.special}
    return {
        i: theirs[t.content] for i, t in teacher_tok.added_tokens_decoder.items() if t.special and t.content in theirs
    }


def build_vocab_map(
    teacher: TokenBytes, student: TokenBytes, special_pairs: Mapping[int, int] | None = None
) -> VocabMap:
    """Match every teacher id to a student id by its bytes (module docstring).

    Args:
        teacher: ``token_bytes`` of the teacher tokenizer (its model's vocabulary size).
        student: ``token_bytes`` of the student tokenizer.
        special_pairs: teacher special id -> student special id.
    """
    by_bytes: dict[bytes, int] = {}
    for i, piece in enumerate(student.pieces):
        if piece and piece not in by_bytes:  # the lowest id of a byte string that occurs twice
            by_bytes[piece] = i
    longest = max((len(p) for p in by_bytes), default=0)
    exact = torch.full((len(teacher),), -1, dtype=torch.int64)
    prefix = torch.full((len(teacher),), -1, dtype=torch.int64)
    for i, piece in enumerate(teacher.pieces):
        if not piece:
            continue
        exact[i] = by_bytes.get(piece, -1)
        for cut in range(min(len(piece) - 1, longest), 0, -1):
            s = by_bytes.get(piece[:cut])
            if s is not None:
                prefix[i] = s
                break
    for t, s in (special_pairs or {}).items():
        if not 0 <= t < len(teacher) or not 0 <= s < len(student):
            raise ValueError(f"special_pairs: {t} -> {s} is outside the vocabularies ({len(teacher)}, {len(student)})")
        exact[t] = s
    return VocabMap(exact, prefix)


@dataclass
class MappedTarget:
    """What ``map_target`` returns.

    Attributes:
        target: the target over student ids, entries sorted by probability (descending), padded with id 0 /
            ``-inf`` to the input's width; ``tail`` = the input's tail plus the unmatched mass.
        matched: ``(N,)`` share of the row's kept teacher mass that went to an exact match (NaN for empty rows).
        prefixed: ``(N,)`` share of it that went to a prefix token (rule ``"prefix"``; 0 otherwise).
    """

    target: SparseTarget
    matched: Tensor
    prefixed: Tensor


def map_target(target: SparseTarget, vmap: VocabMap, rule: Rule = "tail") -> MappedTarget:
    """A teacher ``SparseTarget`` over teacher ids -> one over student ids (module docstring).

    Entries mapping to the same student id are merged (their probabilities add: ``logsumexp`` of their log-probs,
    in fp64, so a single entry keeps its value exactly); entries are sorted by probability, descending, ties in
    their input order.
    """
    ids, lp = target.ids, target.logprobs  # (N, K)
    n, k = ids.shape
    if n and int(ids.max()) >= vmap.exact.numel():
        raise ValueError(
            f"map_target: teacher id {int(ids.max())} is outside the vocabulary map ({vmap.exact.numel()})"
        )
    valid = torch.isfinite(lp)
    to_student = vmap.student_ids(rule).to(ids.device)[ids]  # (N, K)
    ok = valid & (to_student >= 0)
    lp64 = lp.double()
    p = torch.where(valid, lp64.exp(), 0.0)  # (N, K)
    kept = p.sum(-1)  # (N,)
    exact_ok = valid & (vmap.exact.to(ids.device)[ids] >= 0)
    matched = torch.where(exact_ok, p, 0.0).sum(-1) / kept
    prefixed = torch.where(ok & ~exact_ok, p, 0.0).sum(-1) / kept
    unmatched = torch.where(valid & ~ok, p, 0.0).sum(-1)  # (N,) mass for the tail

    # No row maps two of its entries to one student id (the usual case: a top-p-k row's teacher ids are distinct
    # and the tail rule's exact matches are one-to-one): nothing merges, every group below is one entry whose
    # log-sum-exp is its own value, and the general path reduces to one stable sort of the matched entries by
    # probability -- the same result, bit for bit, at about a third of the cost (1,024 rows x 100 entries: 8.7 ms
    # instead of 23.8 on one CPU thread; benchmarks/RESULTS.md, issue 20).
    probe = torch.where(ok, to_student, -1 - torch.arange(k, device=ids.device))  # unmatched: distinct negatives
    probe = probe.sort(dim=1).values
    if not bool((probe[:, 1:] == probe[:, :-1]).any()):
        glp = torch.where(ok, lp, float("-inf")) + 0.0  # + 0.0: -0.0 -> 0.0 as the general path's sum does
        by_prob = torch.argsort(-glp, dim=1, stable=True)
        glp, gid = glp.gather(1, by_prob), to_student.gather(1, by_prob)
        gid = torch.where(torch.isfinite(glp), gid, 0)
        return _finish(target, gid, glp, kept, matched, prefixed, unmatched)

    # Group equal student ids within a row: sort by id (unmatched last), a group starts where the id changes.
    big = torch.iinfo(torch.int64).max
    key = torch.where(ok, to_student, big)
    key_sorted, order = torch.sort(key, dim=1, stable=True)
    lp_sorted = torch.where(key_sorted != big, lp64.gather(1, order), float("-inf"))
    start = torch.ones_like(key_sorted, dtype=torch.bool)
    start[:, 1:] = key_sorted[:, 1:] != key_sorted[:, :-1]
    group = start.long().cumsum(1) - 1  # (N, K) group index within the row
    gmax = torch.full((n, k), float("-inf"), dtype=torch.float64, device=ids.device)
    gmax = gmax.scatter_reduce(1, group, lp_sorted, "amax")
    safe_max = torch.where(torch.isfinite(gmax), gmax, 0.0)
    terms = torch.where(torch.isfinite(lp_sorted), (lp_sorted - safe_max.gather(1, group)).exp(), 0.0)
    gsum = torch.zeros((n, k), dtype=torch.float64, device=ids.device).scatter_add(1, group, terms)
    glp = torch.where(gsum > 0, safe_max + gsum.log(), float("-inf"))  # (N, K) one entry per group, -inf = none
    gid = torch.zeros((n, k), dtype=torch.int64, device=ids.device).scatter(
        1, group, torch.where(key_sorted != big, key_sorted, 0)
    )
    first = torch.full((n, k), k, dtype=torch.int64, device=ids.device).scatter_reduce(1, group, order, "amin")
    # Order: probability descending, ties by the group's first input position (two stable sorts).
    by_first = torch.argsort(first, dim=1, stable=True)
    glp, gid = glp.gather(1, by_first), gid.gather(1, by_first)
    by_prob = torch.argsort(-glp, dim=1, stable=True)  # -(-inf) = inf: empty groups last
    glp, gid = glp.gather(1, by_prob), gid.gather(1, by_prob)
    gid = torch.where(torch.isfinite(glp), gid, 0)
    return _finish(target, gid, glp, kept, matched, prefixed, unmatched)


def _finish(
    target: SparseTarget, gid: Tensor, glp: Tensor, kept: Tensor, matched: Tensor, prefixed: Tensor, unmatched: Tensor
) -> MappedTarget:
    """``map_target``'s result from the mapped entries (``gid``, ``glp``) and the per-row masses."""
    ids, lp = target.ids, target.logprobs
    tail = target.tail
    if tail is not None or bool((unmatched > 0).any()):
        base = tail if tail is not None else (1.0 - kept).clamp(min=0.0).to(lp.dtype)
        tail = base + unmatched.to(base.dtype)
    mapped = replace(target, ids=gid.to(ids.dtype), logprobs=glp.to(lp.dtype), tail=tail)
    return MappedTarget(mapped, matched.float(), prefixed.float())


def student_targets(
    teacher_rows: SparseTarget, alignment: Alignment, vmap: VocabMap, rule: Rule = "tail"
) -> MappedTarget:
    """The teacher's rows (one per teacher position of ``alignment.teacher_ids``) as targets for the student's
    positions: row ``i`` is the mapped teacher row ``alignment.teacher_position[i]``; an unaligned position gets an
    empty row (no valid entry: ``DistillLoss`` does not count it) with tail, std, entropy and power sums 0.

    ``matched`` / ``prefixed`` are NaN at unaligned positions."""
    pos = alignment.teacher_position.to(teacher_rows.ids.device)  # (n,)
    if teacher_rows.ids.shape[0] != len(alignment.teacher_ids):
        raise ValueError(
            f"student_targets: {teacher_rows.ids.shape[0]} teacher rows for {len(alignment.teacher_ids)} teacher tokens"
        )
    return masked_targets(teacher_rows.select(pos.clamp(min=0)), pos >= 0, vmap, rule)


def masked_targets(picked: SparseTarget, aligned: Tensor, vmap: VocabMap, rule: Rule = "tail") -> MappedTarget:
    """Teacher rows already in student order (row ``i`` is the teacher's row for student position ``i``, anything
    where ``aligned[i]`` is False) mapped onto student ids, the unaligned rows emptied (as ``student_targets``).

    Args:
        picked: ``(n, K)`` teacher target, one row per student position.
        aligned: ``(n,)`` bool.
    """
    aligned = aligned.to(picked.ids.device)
    out = map_target(picked, vmap, rule)
    t = out.target

    def blank(x: Tensor | None, value: float) -> Tensor | None:
        if x is None:
            return None
        mask = aligned.view(-1, *([1] * (x.dim() - 1)))
        return torch.where(mask, x, torch.tensor(value, dtype=x.dtype, device=x.device))

    target = replace(
        t,
        ids=blank(t.ids, 0),
        logprobs=blank(t.logprobs, float("-inf")),
        std=blank(t.std, 0.0),
        entropy=blank(t.entropy, 0.0),
        tail=blank(t.tail, 0.0),
        power_sums=None if t.power_sums is None else {g: blank(u, 0.0) for g, u in t.power_sums.items()},
    )
    nan = float("nan")
    return MappedTarget(target, blank(out.matched, nan), blank(out.prefixed, nan))
