"""Alignment of a student's token sequence with a teacher's tokenization of the same bytes (issue 20, item 1).

The student's row of token ids is turned back into bytes (``TokenBytes``: exact for byte-level BPE); the teacher
tokenizer tokenizes the same text; each tokenization's tokens end at byte offsets. Student position ``i`` has consumed
the tokens ``0..i`` -- the prefix ending at byte ``b_i`` -- and predicts the next *student* token. It is **aligned**
when some teacher position ``j`` has consumed exactly the same prefix (its tokens ``0..j`` end at the same byte
``b_i``): both models then condition on the same text, and the teacher's next-*teacher*-token distribution at ``j``
is a distribution over how the text continues after byte ``b_i``, which ``vocab_map.map_target`` turns into one over
student tokens. This is the "exact alignment of prefix boundaries" used by ULD's span alignment (Boizard et al.
2024, arXiv 2402.12030, as in TRL's GOLD trainer) and by ALM (Minixhofer et al. 2025, arXiv 2503.20083: chunks
whose boundaries coincide in both tokenizations); DSKD and MinED align tokens by edit distance instead, which we
do not follow.

Our choices, marked [D]:

- [D] Unaligned positions are **masked** from the KD loss (their target row is empty, so ``DistillLoss.counted``
  leaves them out of the mean), not given the nearest earlier aligned position's distribution: that one predicts
  other text. Their LM loss is unaffected.
- Multi-byte UTF-8 characters: byte-level BPE may split a character's bytes across tokens, and two tokenizers may
  split it differently (or one keeps it whole). A position inside a character is aligned only if the other
  tokenization splits there too; else it is masked like any other unaligned position.
- [D] A row is a window of a longer token stream, so its first and last characters may be cut: the bytes before the
  first character boundary and after the last complete character are not given to the teacher (the positions ending
  there are unaligned). Inside a row, bytes that are not UTF-8 text are refused (``ValueError`` naming the row).
- [D] Special tokens (0 bytes: ``<|endoftext|>`` between documents) split the row into segments that the teacher
  tokenizes separately, so no teacher token spans a document boundary. Where ``separators`` maps a student special
  token to a teacher id (its own end-of-text), that id is put between the segments: the student position after the
  special token is aligned with the teacher position after the separator, and the position before it (which
  predicts the special token) with the teacher position that predicts the separator. Without a mapping both are
  unaligned (the teacher's context would run on into the next document).
- Teacher tokens must round-trip the bytes (the concatenation of their bytes is the segment's bytes), else
  ``ValueError`` names the row and the byte where they differ: byte-exact offsets need a byte-level BPE teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pd_lightning.crosstok.bytes import TokenBytes


@dataclass
class Alignment:
    """One student row aligned with the teacher's tokenization of its text.

    Attributes:
        teacher_ids: the teacher's token ids for the row's text (what the teacher runs over, in order: optional
            prefix, then each segment's tokens, with separators between segments where mapped).
        teacher_position: ``(n,)`` int64: for each student position ``i`` the teacher position ``j`` that consumed the
            same bytes (so the teacher's row ``j`` predicts what follows student position ``i``), or ``-1``.
        student_ends: byte offset at which each student token ends, in the row's bytes.
    """

    teacher_ids: list[int]
    teacher_position: Tensor
    student_ends: list[int]

    @property
    def aligned(self) -> Tensor:
        """``(n,)`` bool: student positions with a teacher position."""
        return self.teacher_position >= 0

    @property
    def aligned_fraction(self) -> float:
        """Share of the row's student positions that are aligned."""
        n = self.teacher_position.numel()
        return float(self.aligned.sum()) / n if n else 0.0


def _leading_continuations(data: bytes) -> int:
    """Bytes before the first character start (at most 3 UTF-8 continuation bytes ``0b10xxxxxx``)."""
    n = 0
    while n < min(3, len(data)) and data[n] & 0xC0 == 0x80:
        n += 1
    return n


def _trailing_partial(data: bytes) -> int:
    """Bytes of an incomplete last character (0 when the data ends on a character boundary)."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte: look further back for the lead byte
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return back if back < need else 0
    return 0


def align(
    student_ids: Sequence[int],
    student: TokenBytes,
    teacher_tok,
    teacher: TokenBytes,
    separators: Mapping[int, int] | None = None,
    teacher_prefix: Sequence[int] = (),
    name: str = "sequence 0",
) -> Alignment:
    """Align one student row with the teacher tokenizer's tokenization of its bytes (module docstring).

    Args:
        student_ids: the row's student token ids (a token file row: ``input_ids`` plus the last label).
        student: ``token_bytes`` of the student tokenizer (must be exact: byte-level BPE).
        teacher_tok: the teacher's ``PreTrainedTokenizerFast``; called as ``encode(text, add_special_tokens=False)``.
        teacher: ``token_bytes(teacher_tok)``.
        separators: student special-token id -> the teacher id to put between segments (e.g. ``{student_eos:
            teacher_eos}``); a special token without one leaves the positions around it unaligned.
        teacher_prefix: ids before the first segment (a teacher that expects a BOS); shifts the teacher positions.
        name: how error messages name the row.
    """
    if not student.exact:
        raise ValueError("align: the student tokenizer is not a byte-level BPE, so its tokens' bytes are not exact")
    separators = dict(separators or {})
    n = len(student_ids)
    position = [-1] * n
    ends: list[int] = []
    total = 0
    for i in student_ids:
        total += len(student.pieces[i])
        ends.append(total)
    teacher_ids: list[int] = list(teacher_prefix)
    k = 0
    while k < n:
        sid = student_ids[k]
        if len(student.pieces[sid]) == 0:  # a special token (or an id beyond the tokenizer): a segment boundary
            if sid in separators:
                teacher_ids.append(separators[sid])
                position[k] = len(teacher_ids) - 1
            elif k > 0:
                position[k - 1] = -1  # it predicts the special token, the teacher the next document's text
            k += 1
            continue
        stop = k
        while stop < n and len(student.pieces[student_ids[stop]]) > 0:
            stop += 1
        start_byte = ends[k - 1] if k > 0 else 0
        data = student.join(student_ids[k:stop])
        lead = _leading_continuations(data) if k == 0 else 0
        trail = _trailing_partial(data) if stop == n else 0
        body = data[lead : len(data) - trail]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"align: {name}: the student tokens' bytes are not UTF-8 text at byte {start_byte + lead + e.start} "
                f"({body[max(0, e.start - 8) : e.start + 8]!r})"
            ) from None
        t_ids = teacher_tok.encode(text, add_special_tokens=False) if text else []
        t_bytes = teacher.join(t_ids)
        if t_bytes != body:
            at = next((x for x, (a, b) in enumerate(zip(t_bytes, body)) if a != b), min(len(t_bytes), len(body)))
            raise ValueError(
                f"align: {name}: the teacher tokenizer does not round-trip the bytes at byte {start_byte + lead + at} "
                f"({body[max(0, at - 8) : at + 8]!r} became {t_bytes[max(0, at - 8) : at + 8]!r}); byte-exact "
                "alignment needs a byte-level BPE teacher"
            )
        base = len(teacher_ids)
        teacher_ids.extend(t_ids)
        at_byte: dict[int, int] = {}
        offset = start_byte + lead
        for j, t in enumerate(t_ids):
            offset += len(teacher.pieces[t])
            at_byte[offset] = base + j
        for p in range(k, stop):
            position[p] = at_byte.get(ends[p], -1)
        k = stop
    return Alignment(teacher_ids, torch.tensor(position, dtype=torch.int64), ends)
