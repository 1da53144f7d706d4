"""The bytes of each token id, and bits per byte (``val/bpb``): held-out loss that compares tokenizers.

Nats per token depend on how many tokens a text takes, so two students (or a student and a teacher) with different
tokenizers cannot be compared by ``val/loss``. Bits per byte divides the same total by the text's length in UTF-8
bytes instead (the measure of Gao et al. 2020, "The Pile", and of cross-tokenizer work since):

    bpb = (sum over held-out target tokens of -ln p(token)) / ln 2 / (sum over the same tokens of their byte length)

The byte length of a token comes from a per-id table built once per run (``token_bytes``):

- Byte-level BPE (GPT-2 / Qwen / Llama-3 style, and every tokenizer ``pd-lightning prepare`` trains): each vocabulary
  entry is a string over GPT-2's 256-character byte alphabet, so its bytes are exact, and the bytes of a sequence are
  the concatenation of its tokens' bytes, also where a token holds only part of a multi-byte UTF-8 character (the
  tokenizer splits 😀's four bytes into two tokens, say). ``tests/test_crosstok_bytes.py`` checks this on real
  English, CJK text and emoji (``check_round_trip``).
- Special tokens (``<|endoftext|>`` and other added tokens marked special) count 0 bytes: they stand for no text.
  [D] Their nats still count in the numerator: predicting a document's end is part of modelling the held-out
  stream, and every tokenizer pays for its own end marker. Added tokens that are not special count their text's bytes.
- Other tokenizers (SentencePiece with byte fallback, WordPiece, ...): [D] an approximation, marked by
  ``TokenBytes.exact = False``: byte-fallback pieces ``<0xNN>`` count 1 byte, SentencePiece's ``▁`` counts as a
  space, any other piece its string's UTF-8 bytes. This miscounts where decoding is not a concatenation (the first
  ``▁`` a decoder strips, WordPiece's ``##``); ``check_round_trip`` measures whether it holds on given texts, and
  refuses (naming the first text where it does not) when exactness is needed, as the cross-tokenizer alignment does.

Reduction over ranks (``BitsPerByte``): the nats and the bytes are summed over every batch and every rank, then
divided once: the ratio of totals, not a mean of per-batch or per-rank ratios.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor
from torchmetrics import Metric

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


@cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte (the inverse of ``bytes_to_unicode`` in GPT-2's encoder.py,
    which ``tokenizers``' ``ByteLevel`` pre-tokenizer uses): printable bytes map to themselves, the others to
    ``chr(256 + n)`` in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


def is_byte_level(tok) -> bool:
    """Whether ``tok`` (a ``PreTrainedTokenizerFast``) is a byte-level BPE: a BPE model whose decoder is ``ByteLevel``
    (alone or inside a ``Sequence``)."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return (spec.get("model") or {}).get("type") == "BPE" and any(d.get("type") == "ByteLevel" for d in parts)


@dataclass(frozen=True)
class TokenBytes:
    """The bytes of every token id of one tokenizer (``token_bytes``).

    Attributes:
        pieces: ``pieces[i]`` is the bytes token id ``i`` stands for; ``b""`` for special tokens and for ids beyond
            the tokenizer's vocabulary (a model's padded vocabulary).
        exact: True for byte-level BPE, where the bytes of any id sequence are the concatenation of its pieces.
        special: ids of the special tokens (0 bytes).
    """

    pieces: tuple[bytes, ...]
    exact: bool
    special: frozenset[int]

    def __len__(self) -> int:
        return len(self.pieces)

    def lengths(self) -> Tensor:
        """``(V,)`` int64 byte length of every id."""
        return torch.tensor([len(p) for p in self.pieces], dtype=torch.int64)

    def join(self, ids: Iterable[int]) -> bytes:
        """The bytes of a sequence of ids: the concatenation of their pieces."""
        return b"".join(self.pieces[i] for i in ids)

    def ends(self, ids: Sequence[int]) -> list[int]:
        """Byte offset (exclusive) at which each token of ``ids`` ends: the cumulative sum of the piece lengths."""
        out, total = [], 0
        for i in ids:
            total += len(self.pieces[i])
            out.append(total)
        return out


def token_bytes(tok, vocab_size: int | None = None) -> TokenBytes:
    """The bytes of each id of a Hugging Face fast tokenizer (see the module docstring for the rules).

    Args:
        tok: a ``PreTrainedTokenizerFast`` (``pd_lightning.corpus.tokenizer.load_tokenizer``).
        vocab_size: length of the table; ``None`` = ``len(tok)``. Larger sizes (a model's padded vocabulary) give
            ``b""`` to the extra ids; a size smaller than the tokenizer's is refused.
    """
    n = len(tok)
    size = n if vocab_size is None else vocab_size
    if size < n:
        raise ValueError(f"vocab_size {size} is smaller than the tokenizer's {n} ids")
    backend = tok.backend_tokenizer
    added = {i: t for i, t in tok.added_tokens_decoder.items()}  # id -> AddedToken
    special = frozenset(i for i, t in added.items() if t.special)
    exact = is_byte_level(tok)
    table = byte_decoder()
    pieces: list[bytes] = []
    for i in range(size):
        piece = backend.id_to_token(i) if i < n else None
        if piece is None or i in special:
            pieces.append(b"")
        elif i in added:  # a non-special added token: its text, as the decoder emits it
            pieces.append(added[i].content.encode("utf-8"))
        elif exact:
            try:
                pieces.append(bytes(table[c] for c in piece))
            except KeyError:
                raise ValueError(
                    f"tokenizer: id {i} ({piece!r}) holds a character outside the byte-level alphabet, so its bytes "
                    "are unknown"
                ) from None
        else:
            m = _BYTE_PIECE.match(piece)
            pieces.append(bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8"))
    return TokenBytes(tuple(pieces), exact, special)


def check_round_trip(tok, table: TokenBytes, texts: Iterable[str], what: str = "text") -> None:
    """Refuse when the tokens' bytes do not concatenate back to a text: ``ValueError`` naming the first bad one.

    For each text, ``table.join(tok.encode(text)) == text.encode("utf-8")`` must hold (no special tokens added).

    Args:
        tok: the tokenizer ``table`` was built from.
        table: ``token_bytes(tok)``.
        texts: the texts to check.
        what: how the message names an item (``"sequence"``, ``"document"``), followed by its index.
    """
    for n, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False)
        got, want = table.join(ids), text.encode("utf-8")
        if got != want:
            at = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ValueError(
                f"the tokenizer does not round-trip the bytes of {what} {n}: its tokens' bytes differ from the text "
                f"at byte {at} ({want[max(0, at - 8) : at + 8]!r} became {got[max(0, at - 8) : at + 8]!r}); "
                "byte-exact offsets need a byte-level BPE tokenizer"
            )


def tokenizer_folder(datamodule) -> str | None:
    """The tokenizer folder of the data a module trains / validates on, or ``None`` when it names none: the data
    module's ``tokenizer_path`` (a token file's), else its validation token file's (``val_file``, a cache's)."""
    for owner in (datamodule, getattr(datamodule, "val_file", None)):
        path = getattr(owner, "tokenizer_path", None) if owner is not None else None
        if path:
            return str(path)
    return None


@cache
def byte_lengths(folder: str, vocab_size: int | None = None) -> Tensor:
    """``(V,)`` int64 bytes per id of the tokenizer in ``folder`` (built once per process and folder)."""
    from pd_lightning.corpus.tokenizer import load_tokenizer

    return token_bytes(load_tokenizer(folder), vocab_size).lengths()


def target_bytes(labels: Tensor, lengths: Tensor, ignore_index: int = -100) -> Tensor:
    """Total bytes of the target tokens ``labels`` (any shape; ``ignore_index`` entries count 0), int64 scalar."""
    table = lengths.to(labels.device)
    counted = labels != ignore_index
    return torch.where(counted, table[labels.clamp(min=0)], 0).sum()


class BitsPerByte(Metric):
    """``sum nats / ln 2 / sum bytes`` over everything it was updated with, summed over all ranks before dividing
    (fp64 sums; ``dist_reduce_fx="sum"``).

    ``update(nats, bytes)`` takes a batch's total nats (mean loss x counted tokens) and the bytes of its target
    tokens (``target_bytes``).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nats", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bytes", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nats: Tensor, num_bytes: Tensor) -> None:
        self.nats += nats.detach().double()
        self.bytes += num_bytes.detach().double()

    def compute(self) -> Tensor:
        return (self.nats / math.log(2) / self.bytes).float()
