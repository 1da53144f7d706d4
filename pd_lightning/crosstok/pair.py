"""A student tokenizer and a teacher tokenizer, paired for distillation (issue 20, item 3): what ``predict`` and the
in-step teacher do per batch when the teacher has its own tokenizer.

Per batch of student rows (``(B, L + 1)`` ids: ``L`` predicted positions):

1. ``teacher_batch``: each row is aligned with the teacher's tokenization of its bytes (``align.align``, separators
   ``{student_eos: teacher_eos}``); the teacher's ids are cut after the last teacher position any of the ``L``
   student positions is aligned with (the teacher never runs further than it is read) and right-padded to the
   batch's longest (causal: padding never changes an earlier position's logits).
2. The caller runs the teacher over those ids: ``(B, T, V_t)`` logits.
3. ``targets``: the teacher's logits at the aligned teacher position of every student position are gathered
   (``(B, L, V_t)``, the same shape as a same-tokenizer teacher's), truncated by the usual ``LogitsProcessor`` with
   the *student* positions' keys (``position_keys(sequence, L)``, as the ordinary path), and mapped onto student ids
   (``vocab_map.masked_targets``; unaligned positions get empty rows).

Exactness: with two equal tokenizers and rows whose text re-tokenizes to their own ids, the teacher runs over the
same ids in the same shape, the gathered logits are the teacher's logits themselves, the keys are equal and the
mapping is the identity: the targets are bit for bit the ordinary path's (``tests/test_crosstok_predict.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from pd_lightning.crosstok.align import align
from pd_lightning.crosstok.bytes import TokenBytes, check_round_trip, is_byte_level, token_bytes
from pd_lightning.crosstok.vocab_map import (
    MappedTarget,
    Rule,
    VocabMap,
    build_vocab_map,
    masked_targets,
    special_pairs_by_content,
)
from pd_lightning.distill.processors import LogitsProcessor

RULES = ("tail", "prefix")
CHECK_ROWS = 64  # rows whose text both tokenizers must round-trip before anything runs


def check_rule(rule: str, flag: str) -> str:
    if rule not in RULES:
        raise ValueError(f"{flag} must be one of {list(RULES)}, got {rule!r}")
    return rule


def _separators(student_tok, teacher_tok) -> dict[int, int]:
    """Student special id -> teacher special id: the end-of-text tokens, and special tokens of equal text."""
    pairs = special_pairs_by_content(student_tok, teacher_tok)
    if student_tok.eos_token_id is not None and teacher_tok.eos_token_id is not None:
        pairs[int(student_tok.eos_token_id)] = int(teacher_tok.eos_token_id)
    return pairs


def row_text(ids: Sequence[int], table: TokenBytes) -> str:
    """A row's text for the round-trip check: its tokens' bytes (special tokens: none), cut characters dropped."""
    return table.join(ids).decode("utf-8", errors="ignore")


@dataclass
class TokenizerPair:
    """The student's and the teacher's tokenizers and the vocabulary map between them (built once per run).

    Attributes:
        student: ``token_bytes`` of the student tokenizer (the token file's vocabulary size).
        teacher: ``token_bytes`` of the teacher tokenizer (the teacher model's vocabulary size).
        student_tok, teacher_tok: the ``PreTrainedTokenizerFast`` of each.
        vmap: teacher id -> student id.
        separators: student special id -> teacher special id (``align``).
        rule: the mapping rule for teacher tokens without an exact student match (``vocab_map``).
        pad_id: the id teacher rows are right-padded with.
    """

    student: TokenBytes
    teacher: TokenBytes
    student_tok: object
    teacher_tok: object
    vmap: VocabMap
    separators: dict[int, int]
    rule: Rule
    pad_id: int

    @classmethod
    def load(
        cls,
        student_folder: str | None,
        student_vocab: int,
        teacher_folder: str | None,
        teacher_vocab: int,
        rule: str,
        *,
        student_flag: str,
        teacher_flag: str,
        rule_flag: str,
        teacher_fingerprint: str | None = None,
    ) -> TokenizerPair:
        """Load both tokenizers and build the tables; every refusal is one ``ValueError`` line naming the flag.

        Args:
            student_folder: the student's tokenizer folder (the token file's).
            student_vocab: the student's vocabulary size (the token file's).
            teacher_folder: the teacher's tokenizer folder, ``None`` when the teacher names none.
            teacher_vocab: the teacher model's vocabulary size (its logits' width).
            rule: ``tail`` or ``prefix``.
            student_flag, teacher_flag, rule_flag: the flags error messages name.
            teacher_fingerprint: the tokenizer the teacher records (a pd-lightning checkpoint's); the folder's must
                be that one.
        """
        from pd_lightning.corpus.tokenizer import load_tokenizer, tokenizer_fingerprint

        check_rule(rule, rule_flag)
        if teacher_folder is None or not _has_tokenizer(teacher_folder):
            raise ValueError(
                f"{teacher_flag} holds no tokenizer (no tokenizer.json / tokenizer_config.json): a teacher with "
                "another tokenizer than the student's needs its own to read the student's text"
            )
        if not student_folder or not _has_tokenizer(student_folder):
            raise ValueError(
                f"{student_flag}: the student's tokenizer folder {student_folder!r} (named by the token file) is "
                "missing or holds no tokenizer: the student's text is decoded with it (keep the tokenizer/ folder "
                "`pd-lightning prepare` wrote next to the token file)"
            )
        student_tok = load_tokenizer(student_folder, flag=student_flag)
        teacher_tok = load_tokenizer(teacher_folder, flag=teacher_flag)
        found = tokenizer_fingerprint(teacher_tok)
        if teacher_fingerprint is not None and found != teacher_fingerprint:
            raise ValueError(
                f"{teacher_flag} was trained with tokenizer {teacher_fingerprint}, but its tokenizer folder "
                f"{teacher_folder} holds tokenizer {found}: restore the teacher's own tokenizer folder"
            )
        for tok, flag, who in ((student_tok, student_flag, "student"), (teacher_tok, teacher_flag, "teacher")):
            if not is_byte_level(tok):
                raise ValueError(
                    f"{flag}: the {who}'s tokenizer is not a byte-level BPE (SentencePiece / WordPiece?): its tokens' "
                    "byte offsets are not exact, which cross-tokenizer alignment needs"
                )
        if len(student_tok) > student_vocab:
            raise ValueError(f"{student_flag}: the tokenizer has {len(student_tok)} ids, the data {student_vocab}")
        if len(teacher_tok) > teacher_vocab:
            raise ValueError(
                f"{teacher_flag}: its tokenizer has {len(teacher_tok)} ids, more than the model's {teacher_vocab} "
                "logits"
            )
        student = token_bytes(student_tok, student_vocab)
        teacher = token_bytes(teacher_tok, teacher_vocab)
        separators = _separators(student_tok, teacher_tok)
        # The teacher's end-of-text (and other paired specials) map to the student's: its mass for ending the document
        vmap = build_vocab_map(teacher, student, {t: s for s, t in separators.items()})
        pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else teacher_tok.eos_token_id
        return cls(student, teacher, student_tok, teacher_tok, vmap, separators, rule, int(pad or 0))

    def check_round_trip(
        self, rows: Sequence[Sequence[int]], student_flag: str, teacher_flag: str, what: str = "sequence"
    ) -> None:
        """Refuse (one line naming the tokenizer's flag and the first bad row) when either tokenizer does not turn a
        row's text back into the same bytes (``bytes.check_round_trip``): a normalizer (NFKC, lowercasing) or a lossy
        decoder.

        Args:
            rows: student token rows; row ``n`` is named ``{what} {n}``.
        """
        texts = [row_text(r, self.student) for r in rows]
        both = ((self.student_tok, self.student, student_flag), (self.teacher_tok, self.teacher, teacher_flag))
        for tok, table, flag in both:
            try:
                check_round_trip(tok, table, texts, what=what)
            except ValueError as e:
                raise ValueError(f"{flag}: {str(e).replace('the tokenizer', 'its tokenizer', 1)}") from None

    def teacher_batch(
        self, rows: Sequence[Sequence[int]], length: int, names: Sequence[str] | None = None
    ) -> tuple[Tensor, Tensor]:
        """The teacher's input ids and the aligned teacher position of every student position.

        Args:
            rows: ``B`` student rows of ``length + 1`` ids (or ``length``: no last label), as lists.
            length: ``L``, the predicted positions per row.
            names: how errors name each row (default ``"row b"``).

        Returns:
            ``input_ids`` ``(B, T)`` int64 (right-padded with ``pad_id``) and ``positions`` ``(B, L)`` int64 (``-1``:
            unaligned).
        """
        aligned, cut = [], []
        for b, row in enumerate(rows):
            a = align(row, self.student, self.teacher_tok, self.teacher, self.separators,
                      name=names[b] if names is not None else f"row {b}")  # fmt: skip
            pos = a.teacher_position[:length]
            aligned.append(pos)
            cut.append(a.teacher_ids[: max(int(pos.max()) + 1 if pos.numel() else 0, 1)] or [self.pad_id])
        width = max(len(c) for c in cut)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.int64)
        for b, c in enumerate(cut):
            ids[b, : len(c)] = torch.tensor(c, dtype=torch.int64)
        return ids, torch.stack(aligned) if aligned else torch.zeros(0, length, dtype=torch.int64)

    def targets(
        self,
        logits: Tensor,
        positions: Tensor,
        processor: LogitsProcessor,
        keys: Tensor | None,
        gammas: tuple[float, ...] = (),
    ) -> MappedTarget:
        """Targets over student ids for the ``B * L`` student positions, sequence-major.

        Args:
            logits: ``(B, T, V_t)`` the teacher's logits over ``teacher_batch``'s ids.
            positions: ``(B, L)`` from ``teacher_batch``.
            processor: the truncation (as the ordinary path).
            keys: ``(B * L,)`` keys of the student positions (``position_keys``), or ``None``.
            gammas: the stored ``U_gamma`` powers.
        """
        b, length = positions.shape
        pos = positions.to(logits.device)
        rows = torch.arange(b, device=logits.device)[:, None].expand(b, length)
        picked = logits[rows, pos.clamp(min=0)]  # (B, L, V_t)
        target = processor(picked, keys, gammas=gammas)
        return masked_targets(target, (pos >= 0).reshape(-1), self.vmap, self.rule)


def _has_tokenizer(folder: str | Path) -> bool:
    p = Path(folder)
    return p.is_dir() and any((p / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
