"""The on-disk format of a teacher-logits cache: layout, entry encoding, metadata, errors, checksums.

A cache is a folder of HDF5 shards ``shard-{rank:05d}-of-{world:05d}.h5``, one per writer rank. Rank ``r`` holds
the sequences ``r, r + world, r + 2 * world, ...`` (:func:`shard_sequences`), sorted by global index. Per shard
(``S`` sequences of ``L = seq_len`` predicted positions, ``T = S * L`` positions, ``E`` kept entries):

=====================  =================  ============================================================
dataset                shape, dtype       meaning
=====================  =================  ============================================================
``sequence_index``     (S,) int64         global sequence index of each row (sorted)
``sequence_offsets``   (S + 1,) int64     offset in ``entries`` where each sequence starts (CSR, coarse)
``tokens``             (S, L + 1) int32   the token row: inputs ``row[:-1]``, labels ``row[1:]``
``counts``             (T,) uint8|16|32   kept entries per position (uint8 when the shard's max is <= 255)
``entries``            (E,) uint32|64     packed ``id << 14 | q``; uint32 when ``vocab_size <= 2^18``
``std``                (T,) float16       std of the teacher's raw logits over the full vocabulary
``entropy``            (T,) float16       entropy (nats) of the teacher's full distribution at tau=1
=====================  =================  ============================================================

Entry values: ``q = round(-log p / NLOGP_MAX * 16383)`` with ``NLOGP_MAX = ln(1e6)``, i.e. ``-log p`` in steps
of 8.4e-4 (error <= 4.2e-4). Probabilities below 1e-6 are **clamped up to 1e-6** (q = 16383). Ids are lossless
up to ``2^18`` in uint32 (4 B per entry) and up to ``2^50`` in uint64 (8 B per entry). Positions inside a
sequence are found by ``sequence_offsets[s] + cumsum(counts)``, so the bookkeeping is one ``counts`` element
per position (1 B while no position keeps more than 255 entries) plus 20 B per sequence (index, offset, the
extra label token). Per position: 4 B token id + 1 B count + 4 B statistics + 4 B (or 8 B) per kept entry.

Every dataset is chunked with fletcher32 checksums (4 B per chunk). Chunk targets: ``entries`` 16384 elements
(64 KB), per-position datasets whole sequences of about 2048 positions, ``tokens`` about 4096 ids; each is
evened out so that the last chunk is (almost) full. Root attributes are :class:`CacheSpec` (the identity of the
content) plus ``rank``, ``world_size``, ``num_shard_sequences``, ``num_tokens``, ``num_entries``,
``max_count`` and ``complete`` (written last; a shard is renamed into place only when complete).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from pd_lightning.distill.processors import LogitsProcessor
from pd_lightning.distill.target import SparseTarget

FORMAT_NAME = "pd-lightning-teacher-cache"
SCHEMA_VERSION = 1
Q_BITS = 14  # bits of the quantised -log p in a packed entry
Q_MAX = (1 << Q_BITS) - 1
NLOGP_MAX = math.log(1e6)  # -log p range [0, ln 1e6]; smaller probabilities are clamped to 1e-6
SMALL_VOCAB = 1 << (32 - Q_BITS)  # vocabularies up to 2^18 pack into uint32
MAX_VOCAB = 1 << (64 - Q_BITS)
SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.h5$")
DATASETS = ("sequence_index", "sequence_offsets", "tokens", "counts", "entries", "std", "entropy")


class CacheError(Exception):
    """Base class of teacher-cache errors."""


class CacheIncompleteError(CacheError):
    """A shard is missing or was never finalised (an interrupted predict run)."""


class CacheCorruptError(CacheError):
    """A shard cannot be opened or fails a checksum or consistency check."""


class CacheMismatchError(CacheError):
    """A cache was built with other parameters than the caller's."""


def shard_name(rank: int, world_size: int) -> str:
    """File name of rank ``rank``'s shard among ``world_size``."""
    return f"shard-{rank:05d}-of-{world_size:05d}.h5"


def shard_sequences(num_sequences: int, rank: int, world_size: int) -> np.ndarray:
    """Global sequence indices written by ``rank`` of ``world_size``: ``rank, rank + world_size, ...`` (int64)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}")
    return np.arange(rank, num_sequences, world_size, dtype=np.int64)


def entry_dtype(vocab_size: int) -> np.dtype:
    """Packed entry dtype: uint32 (4 B) for ``vocab_size <= 2^18``, else uint64 (8 B)."""
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [1, 2^50], got vocab_size={vocab_size}")
    return np.dtype(np.uint32 if vocab_size <= SMALL_VOCAB else np.uint64)


def count_dtype(max_entries: int) -> np.dtype:
    """Smallest unsigned dtype that holds ``max_entries`` entries per position."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_entries <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"max_entries={max_entries} is too large")


@dataclass(frozen=True)
class CacheSpec:
    """What a cache's content depends on; two caches with equal specs hold equal data.

    Attributes:
        teacher_fingerprint: identifies the teacher weights (e.g. a hash of its config and checkpoint).
        tokenizer_fingerprint: identifies the tokenizer (from the token file's attributes).
        source_fingerprint: identifies the token file and split (:func:`token_source_fingerprint`).
        vocab_size: width of the teacher's logits.
        seq_len: predicted positions per sequence.
        num_sequences: sequences in the whole cache (all shards).
        max_entries: ``K``, the processor's fixed number of entries per position, or ``None`` when it varies
            (unlimited top-p); then readers pad to the largest count stored. Stored as 0 for ``None``.
        processor: JSON of the processor's ``hparams()``.
        capture_temperature: temperature of the stored log-probabilities (1.0: the plain teacher softmax).
    """

    teacher_fingerprint: str
    tokenizer_fingerprint: str
    source_fingerprint: str
    vocab_size: int
    seq_len: int
    num_sequences: int
    max_entries: int | None
    processor: str
    capture_temperature: float = 1.0

    def __post_init__(self) -> None:
        entry_dtype(self.vocab_size)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got seq_len={self.seq_len}")
        if self.num_sequences < 0:
            raise ValueError(f"num_sequences must be >= 0, got num_sequences={self.num_sequences}")
        if self.max_entries is not None and self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1 or None, got max_entries={self.max_entries}")

    @classmethod
    def for_processor(
        cls,
        processor: LogitsProcessor,
        *,
        vocab_size: int,
        seq_len: int,
        num_sequences: int,
        teacher_fingerprint: str,
        tokenizer_fingerprint: str,
        source_fingerprint: str,
    ) -> CacheSpec:
        """The spec of a cache written with ``processor`` (arguments as the attributes of the same name)."""
        return cls(
            teacher_fingerprint=teacher_fingerprint,
            tokenizer_fingerprint=tokenizer_fingerprint,
            source_fingerprint=source_fingerprint,
            vocab_size=vocab_size,
            seq_len=seq_len,
            num_sequences=num_sequences,
            max_entries=processor.max_entries(vocab_size),
            processor=json.dumps(processor.hparams(), sort_keys=True),
        )

    def to_attrs(self) -> dict[str, Any]:
        """Root attributes (including format name, schema version and the encoding constants)."""
        attrs = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, **asdict(self)}
        attrs["max_entries"] = self.max_entries or 0
        attrs.update(quant_bits=Q_BITS, nlogp_max=NLOGP_MAX, entry_dtype=str(entry_dtype(self.vocab_size)))
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Any, path: Path | str) -> CacheSpec:
        """Read a spec back from a shard's attributes, refusing other formats and schema versions."""
        if attrs.get("format") != FORMAT_NAME:
            raise CacheCorruptError(f"{path} is not a pd-lightning teacher cache shard (format={attrs.get('format')})")
        if int(attrs["schema_version"]) != SCHEMA_VERSION:
            raise CacheMismatchError(
                f"{path} has cache schema_version={attrs['schema_version']}, this code reads {SCHEMA_VERSION}"
            )
        values = {}
        for f in fields(cls):
            value = attrs[f.name]
            values[f.name] = value.item() if isinstance(value, np.generic) else value
        values["max_entries"] = values["max_entries"] or None
        return cls(**values)

    def describe_difference(self, other: CacheSpec) -> str:
        """``"name: mine != theirs"`` for every differing field."""
        return "; ".join(
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        )


@dataclass
class EncodedSequences:
    """Whole sequences in the on-disk representation (numpy, CPU); fields as the shard datasets."""

    sequence_index: np.ndarray  # (S,) int64
    tokens: np.ndarray  # (S, L + 1) int32
    counts: np.ndarray  # (S * L,) count dtype
    entries: np.ndarray  # (E,) entry dtype
    std: np.ndarray  # (S * L,) float16
    entropy: np.ndarray  # (S * L,) float16

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def encode(sequence_index: Tensor, tokens: Tensor, target: SparseTarget, spec: CacheSpec) -> EncodedSequences:
    """Pack whole sequences into the storage representation (runs on the tensors' device, returns numpy).

    Args:
        sequence_index: ``(B,)`` global sequence indices.
        tokens: ``(B, L + 1)`` token rows.
        target: the teacher's target for the ``B * L`` predicted positions, sequence-major.
        spec: the cache spec (vocabulary, ``L``, ``K``).
    """
    b, length = sequence_index.shape[0], spec.seq_len
    if tuple(tokens.shape) != (b, length + 1):
        raise ValueError(f"tokens must have shape ({b}, seq_len + 1 = {length + 1}), got {tuple(tokens.shape)}")
    if target.ids.shape[0] != b * length:
        raise ValueError(f"target has {target.ids.shape[0]} rows, expected {b} sequences x {length} positions")
    if target.std is None or target.entropy is None:
        raise ValueError("target must carry the per-position std and entropy of the full teacher logits")
    valid = torch.isfinite(target.logprobs)  # (N, K)
    counts = valid.sum(-1)  # (N,)
    ids = target.ids[valid].to(torch.int64)  # (E,) row-major = CSR order
    nlogp = -target.logprobs[valid].double()  # (E,)
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= spec.vocab_size:
            raise ValueError(f"teacher ids must lie in [0, vocab_size={spec.vocab_size}), got [{lo}, {hi}]")
        if float(nlogp.min()) < -1e-3:
            raise ValueError(f"stored values must be log-probabilities <= 0, got {-float(nlogp.min()):.4g}")
    if spec.max_entries is not None and counts.numel() and int(counts.max()) > spec.max_entries:
        raise ValueError(f"a position keeps {int(counts.max())} entries, more than max_entries={spec.max_entries}")
    q = torch.round(nlogp.clamp(0.0, NLOGP_MAX) * (Q_MAX / NLOGP_MAX)).to(torch.int64)
    packed = (ids << Q_BITS) | q  # (E,)
    return EncodedSequences(
        sequence_index=sequence_index.detach().to(torch.int64).cpu().numpy(),
        tokens=tokens.detach().to(torch.int32).cpu().numpy(),
        counts=counts.cpu().numpy().astype(count_dtype(spec.max_entries or spec.vocab_size)),
        entries=packed.cpu().numpy().astype(entry_dtype(spec.vocab_size)),
        std=target.std.detach().float().clamp(-65504, 65504).cpu().numpy().astype(np.float16),
        entropy=target.entropy.detach().float().cpu().numpy().astype(np.float16),
    )


@functools.lru_cache(maxsize=8)
def _prefix_table(k: int) -> np.ndarray:
    """``(K + 1, K)`` bool: row ``c`` is True in its first ``c`` columns."""
    return np.arange(k)[None, :] < np.arange(k + 1)[:, None]


def decode(counts: np.ndarray, entries: np.ndarray, max_entries: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR entries -> padded ``ids`` ``(W, K)`` int64 (padding 0) and ``logprobs`` ``(W, K)`` fp32 (padding -inf).

    Args:
        counts: ``(W,)`` entries per position.
        entries: ``(sum(counts),)`` packed entries.
        max_entries: ``K``.
    """
    w, k = counts.shape[0], max_entries
    ids_flat = (entries >> Q_BITS).astype(np.int64)  # (E,)
    lp_flat = (entries & Q_MAX).astype(np.float32) * np.float32(-NLOGP_MAX / Q_MAX)  # (E,)
    if entries.shape[0] == w * k:  # every position full: a reshape, no scatter
        return ids_flat.reshape(w, k), lp_flat.reshape(w, k)
    ids = np.zeros((w, k), dtype=np.int64)
    logprobs = np.full((w, k), -np.inf, dtype=np.float32)
    if k <= 1024:  # (W, K) prefix of each row, gathered from a table: ~10x faster than a broadcast compare
        mask = np.take(_prefix_table(k), counts, axis=0)
    else:
        mask = np.arange(k, dtype=np.int64) < counts.astype(np.int64)[:, None]
    ids[mask] = ids_flat
    logprobs[mask] = lp_flat
    return ids, logprobs


def read_attrs(path: Path) -> dict[str, Any]:
    """Root attributes of a shard as plain Python values (opening errors become :class:`CacheCorruptError`)."""
    try:
        with h5py.File(path, "r") as f:
            return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    except OSError as err:
        raise CacheCorruptError(f"cannot open cache shard {path} (truncated or not an HDF5 file): {err}") from err


def read_dataset(path: Path, dset: h5py.Dataset, sel: Any = slice(None)) -> np.ndarray:
    """``dset[sel]``, turning HDF5 read errors (fletcher32 mismatch, short file) into :class:`CacheCorruptError`."""
    try:
        return dset[sel]
    except OSError as err:
        raise CacheCorruptError(f"cache shard {path}: dataset '{dset.name}' is corrupt ({err})") from err


def content_checksum(path: Path | str, block: int = 1 << 22) -> str:
    """sha256 over the logical content: every shard's attributes and datasets (name, dtype, shape, bytes).

    Equal for caches holding equal data, independent of chunking, write order or interruptions.

    Args:
        path: a cache folder or a single shard file.
        block: elements read per step.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if SHARD_RE.match(p.name))
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with h5py.File(file, "r") as f:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            digest.update(json.dumps(attrs, sort_keys=True, default=str).encode())
            for name in DATASETS:
                dset = f[name]
                digest.update(f"{name}:{dset.dtype.str}:{dset.shape}".encode())
                for start in range(0, dset.shape[0], max(1, block // max(1, int(np.prod(dset.shape[1:]))))):
                    stop = start + max(1, block // max(1, int(np.prod(dset.shape[1:]))))
                    digest.update(np.ascontiguousarray(read_dataset(file, dset, slice(start, stop))).tobytes())
    return digest.hexdigest()


def token_source_fingerprint(tokens_path: Path | str, split: str, sample_rows: int = 16) -> str:
    """A cheap identity of a token file's split: its attributes, shape and ``sample_rows`` evenly spaced rows.

    Args:
        tokens_path: the ``tokens.h5`` written by ``pd-lightning prepare``.
        split: dataset name in it (``train`` or ``val``).
        sample_rows: rows hashed in full.
    """
    from pd_lightning.data.corpus import TokenFile  # lazy: corpus.py is the reader of both token layouts

    # TokenFile checks that every shard of a sharded token file is there and belongs to it. For a legacy single
    # file (int32 datasets) the digest is byte for byte what it was, so existing caches keep matching their tokens.
    tokens = TokenFile(tokens_path)
    digest = hashlib.sha256()
    digest.update(json.dumps(tokens.attrs, sort_keys=True, default=str).encode())
    n = tokens.lengths[split]
    digest.update(f"{split}:<i4:{(n, tokens.seq_len + 1)}".encode())
    for row in sorted({int(i) for i in np.linspace(0, n - 1, num=min(n, sample_rows))} if n else set()):
        digest.update(np.ascontiguousarray(tokens.rows(split, row), dtype="<i4").tobytes())
    return f"{split}:{digest.hexdigest()[:32]}"
