"""The on-disk format of a teacher-logits cache (schemas 2 and 3): layout, entry encoding, metadata, index, errors.

A cache is a folder of self-contained HDF5 shards ``shard-{j:06d}.h5`` plus an index. Shard ``j`` holds the
global sequences ``[j * S, min((j + 1) * S, N))`` (``S = spec.sequences_per_shard``, from ``--writer.shard_tokens``),
so the shards, and the cache's content, do not depend on how many ranks wrote them or where runs were interrupted.
Writer rank ``r`` of ``W`` writes the shards ``j = r, r + W, ...`` (:func:`rank_shards`); a shard is written to
``shard-{j:06d}.h5.tmp``, finished with ``complete=True``, fsynced and renamed into place, then recorded in the
rank's index ``index-{r:05d}-of-{W:05d}.json`` (JSON written to a temporary file, fsynced, renamed). Once every
shard is recorded, ``index.json`` (the whole cache: spec and one record per shard) is written the same way and the
rank indexes are removed. A reader takes the union of ``index.json`` and the rank indexes: the set of finished
shards of any number of writer ranks.

Per shard (``S_j`` sequences of ``L = seq_len`` predicted positions, ``T = S_j * L`` positions, ``E`` kept entries,
``G = len(spec.power_gammas)``):

=====================  =================  ============================================================
dataset                shape, dtype       meaning
=====================  =================  ============================================================
``sequence_index``     (S_j,) int64       global sequence index of each row (consecutive)
``sequence_offsets``   (S_j + 1,) int64   offset in ``entries`` where each sequence starts (CSR, coarse)
``tokens``             (S_j, L + 1) int32 the token row: inputs ``row[:-1]``, labels ``row[1:]``
``counts``             (T,) uint8|16|32   kept entries per position (uint8 while ``K <= 255``)
``entries``            (E,) uint32|64     packed ``id << 14 | q``; uint32 when ``vocab_size <= 2^18``
``std``                (T,) float16       std of the teacher's raw logits over the full vocabulary
``entropy``            (T,) float16       entropy (nats) of the teacher's full distribution at tau=1
``tail``               (T,) float16       teacher mass outside the kept entries, summed over the full distribution
``power_sum``          (T, G) float16     ``U_gamma = sum_v p_v^gamma`` over the full vocabulary, per stored gamma
=====================  =================  ============================================================

Entry values: ``q = round(-log p / nlogp_max * 16383)``: ``-log p`` in steps of ``nlogp_max / 16383`` (error at
most half a step). ``nlogp_max`` is ``ln 1e6`` for truncating processors (step 8.4e-4, probabilities below 1e-6
clamped up to 1e-6) and ``ln(1e6 * V)`` for ``Full`` (clamped mass <= 1e-6 per row; see ``Full``). Ids are lossless
up to ``2^18`` in uint32 (4 B per entry) and up to ``2^50`` in uint64 (8 B). float16 statistics have a relative
error <= 2^-11 (4.9e-4); ``tail`` below 6e-5 is stored as a float16 subnormal (absolute error <= 3e-8). Per
position: 4 B token id + 1 B count + 6 B statistics + 2 B per gamma + 4 B (or 8 B) per kept entry, plus 20 B per
sequence (index, offset, the extra label token).

**Schema 3** (written by default) stores the same values in fewer bytes: ``entries`` is replaced by

=====================  =================  ============================================================
``blocks``             (B,) uint8         coded entry blocks back to back (:mod:`pd_lightning.cache.codec`)
``block_offsets``      (S_j * nb + 1,)    byte offset of each block; ``nb = ceil(L / 2048)`` blocks per sequence,
                       int64              block ``s * nb + b`` = positions ``[b * 2048, (b + 1) * 2048)`` of row ``s``
``id_table``           (n,) uint8         the shard's :class:`~pd_lightning.cache.codec.IdTable` (ids by frequency
                                          in its first ``ceil(2048 / L)`` sequences)
=====================  =================  ============================================================

A block codes, for its positions, the id ranks (through the table) and the differences of the 14-bit codes ``q``
as zstd-compressed byte planes with their own checksums: ~2.2 B per entry at a 151k vocabulary instead of 4 (see
``benchmarks/RESULTS.md``), the same ``q`` and so exactly the same decoded values. The table, and so every byte of
a shard, depends only on the shard's content (not on batch sizes, writer ranks or interruptions). A folder holds
one schema; ``pd-lightning cache-upgrade`` converts schema 2 (or 1) into 3.

Every dataset is chunked with fletcher32 checksums. Root attributes are :class:`CacheSpec` (the identity of the
content) plus ``shard``, ``first_sequence``, ``num_shard_sequences``, ``num_tokens``, ``num_entries``,
``max_count`` and ``complete`` (written last; a shard is renamed into place only when complete).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from pd_lightning.distill.processors import DEFAULT_NLOGP_MAX, LogitsProcessor
from pd_lightning.distill.target import SparseTarget

FORMAT_NAME = "pd-lightning-teacher-cache"
SCHEMA_VERSION = 3  # what writers write by default
SCHEMAS = (2, 3)  # what readers read (schema 1: `pd-lightning cache-upgrade`)
BLOCK_POSITIONS = 2048  # schema 3: positions per coded entry block (a sequence's blocks never span sequences)
TABLE_POSITIONS = 2048  # schema 3: the shard's id table counts the ids of its first sequences covering this many
Q_BITS = 14  # bits of the quantised -log p in a packed entry
Q_MAX = (1 << Q_BITS) - 1
NLOGP_MAX = DEFAULT_NLOGP_MAX  # -log p range of truncating processors; smaller probabilities are clamped to 1e-6
SMALL_VOCAB = 1 << (32 - Q_BITS)  # vocabularies up to 2^18 pack into uint32
MAX_VOCAB = 1 << (64 - Q_BITS)
DEFAULT_SHARD_TOKENS = 1 << 23  # 8.4M positions per shard: ~1.3 GB at the paper's ~150 B/token
INDEX_NAME = "index.json"
SHARD_RE = re.compile(r"^shard-(\d{6})\.h5$")
RANK_INDEX_RE = re.compile(r"^index-(\d{5})-of-(\d{5})\.json$")
SCHEMA1_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.(h5|parts)$")
DATASETS = (
    "sequence_index", "sequence_offsets", "tokens", "counts", "entries", "std", "entropy", "tail", "power_sum",
)  # fmt: skip
DATASETS3 = (
    "sequence_index", "sequence_offsets", "tokens", "counts", "id_table", "blocks", "block_offsets", "std", "entropy",
    "tail", "power_sum",
)  # fmt: skip
STAT_DATASETS = ("std", "entropy", "tail", "power_sum")


class CacheError(Exception):
    """Base class of teacher-cache errors.

    Raised inside a DataLoader worker, PyTorch re-creates the exception in the main process from a message that
    holds the worker's whole traceback; the constructor keeps only the original one-line message then, so the
    user sees one clear line whatever ``--data.num_workers`` is.
    """

    def __init__(self, message: str = "") -> None:
        if message.startswith("Caught ") and "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


class CacheIncompleteError(CacheError):
    """A cache is still being written (or was interrupted): some shards are not finished."""


class CacheCorruptError(CacheError):
    """A shard or index cannot be read or fails a checksum or consistency check."""


class CacheMismatchError(CacheError):
    """A cache was built with other parameters than the caller's."""


def shard_name(shard: int) -> str:
    """File name of shard ``shard``."""
    return f"shard-{shard:06d}.h5"


def rank_index_name(rank: int, world_size: int) -> str:
    """File name of writer rank ``rank``'s index among ``world_size`` ranks."""
    return f"index-{rank:05d}-of-{world_size:05d}.json"


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
        sequences_per_shard: ``S``, sequences per shard (from ``--writer.shard_tokens``).
        nlogp_max: the stored ``-log p`` range (the processor's ``nlogp_max``).
        power_gammas: the gammas whose ``U_gamma`` is stored per position (WTTM).
        teacher_tokenizer_fingerprint: a cross-tokenizer cache (issue 20): the teacher's tokenizer, whose targets
            were aligned with the student's text and mapped onto the student's ids (``tokenizer_fingerprint`` and
            ``vocab_size`` are then the student's); ``""`` for a teacher that reads the student's own tokens. Absent
            from the attributes and index of such caches (and of every cache written before it existed).
        vocab_map_rule: a cross-tokenizer cache's rule for teacher tokens without an exact student match
            (``tail`` or ``prefix``, :mod:`pd_lightning.crosstok.vocab_map`); ``""`` otherwise.
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
    sequences_per_shard: int = 1 << 12
    nlogp_max: float = NLOGP_MAX
    power_gammas: tuple[float, ...] = ()
    teacher_tokenizer_fingerprint: str = ""
    vocab_map_rule: str = ""

    def __post_init__(self) -> None:
        entry_dtype(self.vocab_size)
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got seq_len={self.seq_len}")
        if self.num_sequences < 0:
            raise ValueError(f"num_sequences must be >= 0, got num_sequences={self.num_sequences}")
        if self.max_entries is not None and self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1 or None, got max_entries={self.max_entries}")
        if self.sequences_per_shard < 1:
            raise ValueError(f"sequences_per_shard must be >= 1, got {self.sequences_per_shard}")
        gammas = tuple(float(g) for g in self.power_gammas)
        if any(not g > 0 or math.isinf(g) for g in gammas) or len(set(gammas)) != len(gammas):
            raise ValueError(f"power_gammas must be distinct finite values > 0, got {list(self.power_gammas)}")
        object.__setattr__(self, "power_gammas", gammas)
        if bool(self.teacher_tokenizer_fingerprint) != (self.vocab_map_rule in ("tail", "prefix")):
            raise ValueError(
                "a cross-tokenizer cache records both the teacher's tokenizer fingerprint and the vocab_map_rule "
                f"(tail or prefix), got {self.teacher_tokenizer_fingerprint!r} and {self.vocab_map_rule!r}"
            )

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the teacher's targets were aligned from another tokenization (``teacher_tokenizer_fingerprint``)."""
        return bool(self.teacher_tokenizer_fingerprint)

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
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        power_gammas: tuple[float, ...] | list[float] = (),
        teacher_tokenizer_fingerprint: str = "",
        vocab_map_rule: str = "",
    ) -> CacheSpec:
        """The spec of a cache written with ``processor`` (arguments as the attributes of the same name).

        Args:
            shard_tokens: positions per shard (rounded down to whole sequences, at least one).
        """
        if shard_tokens < 1:
            raise ValueError(f"--writer.shard_tokens must be >= 1, got {shard_tokens}")
        return cls(
            teacher_fingerprint=teacher_fingerprint,
            tokenizer_fingerprint=tokenizer_fingerprint,
            source_fingerprint=source_fingerprint,
            vocab_size=vocab_size,
            seq_len=seq_len,
            num_sequences=num_sequences,
            max_entries=processor.max_entries(vocab_size),
            processor=json.dumps(processor.hparams(), sort_keys=True),
            sequences_per_shard=max(1, shard_tokens // seq_len),
            nlogp_max=processor.nlogp_max(vocab_size),
            power_gammas=tuple(power_gammas),
            teacher_tokenizer_fingerprint=teacher_tokenizer_fingerprint,
            vocab_map_rule=vocab_map_rule,
        )

    # ------------------------------------------------------------------------------------- layout
    @property
    def num_shards(self) -> int:
        return -(-self.num_sequences // self.sequences_per_shard)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Global sequences ``[start, stop)`` of shard ``shard``."""
        start = shard * self.sequences_per_shard
        return start, min(start + self.sequences_per_shard, self.num_sequences)

    def rank_shards(self, rank: int, world_size: int) -> np.ndarray:
        """Shards written by writer rank ``rank`` of ``world_size``: ``rank, rank + world_size, ...`` (int64)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        return np.arange(rank, self.num_shards, world_size, dtype=np.int64)

    # ------------------------------------------------------------------------------------- (de)serialising
    def _fields(self) -> dict[str, Any]:
        """``asdict`` without the cross-tokenizer fields of a same-tokenizer cache, whose attributes and index are
        then exactly those of the caches written before the fields existed."""
        values = asdict(self)
        if not self.cross_tokenizer:
            del values["teacher_tokenizer_fingerprint"], values["vocab_map_rule"]
        return values

    def to_json(self) -> dict[str, Any]:
        return {**self._fields(), "power_gammas": list(self.power_gammas)}

    @classmethod
    def from_json(cls, values: dict[str, Any], path: Path | str) -> CacheSpec:
        try:
            return cls(**{**values, "power_gammas": tuple(values.get("power_gammas", ()))})
        except (TypeError, ValueError) as err:
            raise CacheCorruptError(f"{path}: unreadable cache spec ({err})") from err

    def to_attrs(self, schema: int = SCHEMA_VERSION) -> dict[str, Any]:
        """Root attributes (including format name, schema version and the encoding constants)."""
        check_schema(schema)
        attrs = {"format": FORMAT_NAME, "schema_version": schema, **self._fields()}
        attrs["max_entries"] = self.max_entries or 0
        attrs["power_gammas"] = json.dumps(list(self.power_gammas))
        attrs.update(quant_bits=Q_BITS)
        if schema == 2:
            attrs.update(entry_dtype=str(entry_dtype(self.vocab_size)))
        else:
            attrs.update(entry_coding="pde3", block_positions=BLOCK_POSITIONS, table_positions=TABLE_POSITIONS)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: Any, path: Path | str) -> CacheSpec:
        """Read a spec back from a shard's attributes, refusing other formats and schema versions."""
        if attrs.get("format") != FORMAT_NAME:
            raise CacheCorruptError(f"{path} is not a pd-lightning teacher cache shard (format={attrs.get('format')})")
        schema = int(attrs["schema_version"])
        if schema == 1:
            raise CacheMismatchError(schema1_message(Path(path).parent))
        if schema not in SCHEMAS:
            raise CacheMismatchError(unknown_schema_message(path, schema))
        values = {}
        for f in fields(cls):
            if f.name in _OPTIONAL_FIELDS and f.name not in attrs:
                continue  # a same-tokenizer cache (or one written before the field existed): the default
            value = attrs[f.name]
            values[f.name] = value.item() if isinstance(value, np.generic) else value
        values["max_entries"] = values["max_entries"] or None
        values["power_gammas"] = tuple(json.loads(values["power_gammas"]))
        return cls(**values)

    def describe_difference(self, other: CacheSpec) -> str:
        """``"name: mine != theirs"`` for every differing field."""
        return "; ".join(
            f"{f.name}: {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        )


_OPTIONAL_FIELDS = ("teacher_tokenizer_fingerprint", "vocab_map_rule")  # absent from same-tokenizer caches


def check_schema(schema: int) -> int:
    """``schema`` if this version writes it, else a ``ValueError`` naming ``--writer.schema``."""
    if isinstance(schema, bool) or schema not in SCHEMAS:
        raise ValueError(f"--writer.schema must be one of {list(SCHEMAS)}, got {schema!r}")
    return int(schema)


def unknown_schema_message(path: Path | str, schema: int) -> str:
    return (
        f"{path} is a schema-{schema} teacher cache; this pd-lightning reads schemas {', '.join(map(str, SCHEMAS))} "
        "(written by a newer pd-lightning? upgrade pd-lightning, or write the cache again with `pd-lightning predict`)"
    )


def shard_schema(attrs: Any) -> int:
    """The schema version of a shard from its root attributes (0 when it has none)."""
    try:
        return int(attrs.get("schema_version", 0))
    except (TypeError, ValueError):
        return 0


def schema1_message(path: Path) -> str:
    return (
        f"{path} is a schema-1 teacher cache (written by an older pd-lightning, one merged shard per rank); this "
        f"version reads schemas 2 and 3: convert it with `pd-lightning cache-upgrade {path} --output NEW` "
        "or write it again with `pd-lightning predict`"
    )


# ------------------------------------------------------------------------------------------------ atomic files
def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to ``path`` atomically: a unique temporary file, fsynced, renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(value, fh, sort_keys=True, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheCorruptError(
            f"cannot read cache index {path} ({err}); delete it and rerun `pd-lightning predict`"
        ) from err
    if not isinstance(value, dict) or value.get("format") != FORMAT_NAME:
        raise CacheCorruptError(f"{path} is not a pd-lightning teacher cache index")
    schema = int(value.get("schema_version", 0))
    if schema in (0, 1):
        raise CacheMismatchError(schema1_message(path.parent))
    if schema not in SCHEMAS:
        raise CacheMismatchError(unknown_schema_message(path, schema))
    return value


def index_document(
    spec: CacheSpec, shards: dict[int, dict[str, Any]], schema: int = SCHEMA_VERSION, **extra: Any
) -> dict[str, Any]:
    """The JSON of an index: spec and the records of finished shards (keys: shard numbers as strings)."""
    return {
        "format": FORMAT_NAME,
        "schema_version": check_schema(schema),
        "spec": spec.to_json(),
        "shards": {str(j): shards[j] for j in sorted(shards)},
        **extra,
    }


@dataclass
class CacheLayout:
    """What a cache folder holds: its spec and the finished shards (union of all indexes).

    Attributes:
        path: the folder.
        spec: the cache spec.
        shards: ``{shard: record}`` of finished shards (``sequences``, ``entries``, ``max_count``, ``bytes``).
        final: whether ``index.json`` (written once every shard is finished) exists.
        schema: the schema version of every shard (a folder never mixes two).
    """

    path: Path
    spec: CacheSpec
    shards: dict[int, dict[str, Any]]
    final: bool
    schema: int = SCHEMA_VERSION

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.spec.num_shards

    @property
    def finished_sequences(self) -> int:
        return sum(self.spec.shard_range(j)[1] - self.spec.shard_range(j)[0] for j in self.shards)

    def file(self, shard: int) -> Path:
        return self.path / shard_name(shard)


def read_layout(path: Path | str, check_files: bool = True) -> CacheLayout | None:
    """The union of a cache folder's indexes, or ``None`` when it holds no index.

    Raises:
        CacheMismatchError: indexes of different specs (two caches mixed in one folder), or a schema-1 cache.
        CacheCorruptError: an unreadable index, or (``check_files``) an index naming a shard that is missing.
    """
    path = Path(path)
    names = sorted(p.name for p in path.iterdir())
    if any(SCHEMA1_RE.match(n) for n in names) and not any(n == INDEX_NAME or RANK_INDEX_RE.match(n) for n in names):
        raise CacheMismatchError(schema1_message(path))
    indexes = ([path / INDEX_NAME] if INDEX_NAME in names else []) + [path / n for n in names if RANK_INDEX_RE.match(n)]
    if not indexes:
        return None
    spec, first, shards, schema = None, None, {}, None
    for index in indexes:
        try:
            doc = read_json(index)
        except CacheCorruptError:
            if not index.exists():  # a rank index removed by the writer that just wrote index.json
                continue
            raise
        this = CacheSpec.from_json(doc.get("spec", {}), index)
        this_schema = int(doc["schema_version"])
        if spec is None:
            spec, first, schema = this, index, this_schema
        elif this_schema != schema:
            raise CacheMismatchError(
                f"{path} mixes schema-{schema} and schema-{this_schema} shards ({first.name}, {index.name}); a cache "
                "folder holds one schema: finish it with the schema it was started with (`--writer.schema "
                f"{schema}`), or convert it with `pd-lightning cache-upgrade`"
            )
        elif this != spec:
            raise CacheMismatchError(
                f"{path} mixes two caches: {index.name} was written with other parameters than {first.name} "
                f"({this.describe_difference(spec)}); keep one cache per folder (delete the other's files)"
            )
        for key, record in doc.get("shards", {}).items():
            shards.setdefault(int(key), record)
    if spec is None:  # every index listed was replaced meanwhile (index.json written): look again
        return read_layout(path, check_files)
    for j in shards:
        if not 0 <= j < spec.num_shards:
            raise CacheCorruptError(f"{path}: an index names shard {j}, outside [0, {spec.num_shards})")
        if check_files and not (path / shard_name(j)).is_file():
            raise CacheCorruptError(
                f"{path}: the index names {shard_name(j)}, which is missing; rerun `pd-lightning predict` with the "
                "same arguments to write it again"
            )
    return CacheLayout(path, spec, shards, INDEX_NAME in names, schema)


@dataclass
class EncodedSequences:
    """Whole sequences in the on-disk representation (numpy, CPU); fields as the shard datasets."""

    sequence_index: np.ndarray  # (S,) int64
    tokens: np.ndarray  # (S, L + 1) int32
    counts: np.ndarray  # (S * L,) count dtype
    entries: np.ndarray  # (E,) entry dtype
    std: np.ndarray  # (S * L,) float16
    entropy: np.ndarray  # (S * L,) float16
    tail: np.ndarray  # (S * L,) float16
    power_sum: np.ndarray  # (S * L, G) float16

    def as_dict(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def sequence_entries(self, length: int) -> np.ndarray:
        """``(S,)`` kept entries per sequence."""
        return self.counts.reshape(-1, length).sum(1, dtype=np.int64)


def _finite_or_raise(name: str, value: Tensor, sequence_index: Tensor, length: int) -> None:
    bad = ~torch.isfinite(value.reshape(value.shape[0], -1)).all(-1)  # (N,)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        seq = int(sequence_index[row // length])
        raise ValueError(
            f"non-finite teacher statistic '{name}' at sequence {seq}, position {row % length}; the teacher's logits "
            "are not usable there (check the teacher checkpoint and --model.dtype)"
        )


def encode(sequence_index: Tensor, tokens: Tensor, target: SparseTarget, spec: CacheSpec) -> EncodedSequences:
    """Pack whole sequences into the storage representation (runs on the tensors' device, returns numpy).

    Args:
        sequence_index: ``(B,)`` global sequence indices.
        tokens: ``(B, L + 1)`` token rows.
        target: the teacher's target for the ``B * L`` predicted positions, sequence-major. Its ``tail`` is used
            when present (else ``1 - kept mass``); ``power_sums`` must hold every gamma of ``spec.power_gammas``.
        spec: the cache spec (vocabulary, ``L``, ``K``, value range, gammas).

    Raises:
        ValueError: shapes, ids outside the vocabulary, positive log-probabilities, or non-finite statistics.
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
    tail = target.tail if target.tail is not None else (1.0 - target.kept_mass).clamp(min=0.0)
    sums = []
    for gamma in spec.power_gammas:
        u = target.power_sum(gamma)
        if u is None:
            raise ValueError(f"target lacks U_gamma for gamma={gamma} (the cache stores gammas {spec.power_gammas})")
        sums.append(u.float())
    power = torch.stack(sums, -1) if sums else target.std.new_zeros(b * length, 0)  # (N, G)
    for name, value in (("std", target.std), ("entropy", target.entropy), ("tail", tail), ("power_sum", power)):
        _finite_or_raise(name, value.float(), sequence_index, length)
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
    q = torch.round(nlogp.clamp(0.0, spec.nlogp_max) * (Q_MAX / spec.nlogp_max)).to(torch.int64)
    packed = (ids << Q_BITS) | q  # (E,)

    def half(x: Tensor) -> np.ndarray:
        return x.detach().float().clamp(-65504, 65504).cpu().numpy().astype(np.float16)

    return EncodedSequences(
        sequence_index=sequence_index.detach().to(torch.int64).cpu().numpy(),
        tokens=tokens.detach().to(torch.int32).cpu().numpy(),
        counts=counts.cpu().numpy().astype(count_dtype(spec.max_entries or spec.vocab_size)),
        entries=packed.cpu().numpy().astype(entry_dtype(spec.vocab_size)),
        std=half(target.std),
        entropy=half(target.entropy),
        tail=half(tail),
        power_sum=half(power),
    )


@functools.lru_cache(maxsize=8)
def _prefix_table(k: int) -> np.ndarray:
    """``(K + 1, K)`` bool: row ``c`` is True in its first ``c`` columns."""
    return np.arange(k)[None, :] < np.arange(k + 1)[:, None]


def decode(
    counts: np.ndarray, entries: np.ndarray, max_entries: int, nlogp_max: float = NLOGP_MAX
) -> tuple[np.ndarray, np.ndarray]:
    """Schema-2 CSR entries -> padded ``ids`` ``(W, K)`` int64 (padding 0) and ``logprobs`` ``(W, K)`` fp32 (padding
    -inf).

    Args:
        counts: ``(W,)`` entries per position.
        entries: ``(sum(counts),)`` packed entries.
        max_entries: ``K``.
        nlogp_max: the cache's ``-log p`` range (``spec.nlogp_max``).
    """
    ids_flat = (entries >> Q_BITS).astype(np.int64)  # (E,)
    lp_flat = (entries & Q_MAX).astype(np.float32) * np.float32(-nlogp_max / Q_MAX)  # (E,)
    return pad_entries(counts, ids_flat, lp_flat, max_entries)


def pad_entries(
    counts: np.ndarray, ids_flat: np.ndarray, lp_flat: np.ndarray, max_entries: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flat entries (row after row, ``counts[t]`` in row ``t``) -> padded ``ids`` ``(W, K)`` int64 (padding 0) and
    ``logprobs`` ``(W, K)`` fp32 (padding -inf)."""
    w, k = counts.shape[0], max_entries
    if ids_flat.shape[0] == w * k:  # every position full: a reshape, no scatter
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


# ------------------------------------------------------------------------------------------------ schema 3 entries
def code_step(nlogp_max: float) -> float:
    """The ``-log p`` step of a cache's quantised values (both schemas): ``nlogp_max / (2^14 - 1)``."""
    return nlogp_max / Q_MAX


def blocks_per_sequence(seq_len: int) -> int:
    """Schema 3: coded entry blocks per sequence (positions ``[b * 2048, (b + 1) * 2048)`` of it in block ``b``)."""
    return -(-seq_len // BLOCK_POSITIONS)


def table_sequences(seq_len: int) -> int:
    """Schema 3: a shard's id table counts the ids of its first ``table_sequences(L)`` sequences (fewer when the
    shard holds fewer), whatever the batches they were written in: the table, and so the shard's bytes, are a
    function of the shard's content alone."""
    return -(-TABLE_POSITIONS // seq_len)


def shard_id_table(entries: np.ndarray, vocab_size: int):
    """The :class:`~pd_lightning.cache.codec.IdTable` of a shard whose first sequences hold the packed ``entries``
    (schema-2 packing: ``id << 14 | q``)."""
    from pd_lightning.cache.codec import build_id_table

    return build_id_table((entries >> Q_BITS).astype(np.int64), vocab_size)


def encode_sequence_blocks(
    counts: np.ndarray, entries: np.ndarray, seq_len: int, table, nlogp_max: float, first_sequence: int = 0
) -> list[bytes]:
    """Schema 3: the coded blocks of whole sequences (packed schema-2 entries in, the same values out).

    Args:
        counts: ``(S * L,)`` entries per position of ``S`` whole sequences.
        entries: ``(sum(counts),)`` packed entries (``id << 14 | q``), row after row.
        seq_len: ``L``.
        table: the shard's id table.
        nlogp_max: the cache's ``-log p`` range (the step is :func:`code_step`).
        first_sequence: the global index of the first sequence: block ``b`` of sequence ``s`` is coded at position
            :func:`block_position` ``(s, b)``, which its reader must give back (a misplaced block is refused).
    """
    from pd_lightning.cache.codec import encode_codes

    step = code_step(nlogp_max)
    n_seq = counts.shape[0] // seq_len
    starts = np.arange(0, seq_len, BLOCK_POSITIONS)  # block starts inside a sequence
    bounds = (np.arange(n_seq)[:, None] * seq_len + starts[None, :]).reshape(-1)  # (S * nb,) position starts
    edges = np.concatenate([bounds, [counts.shape[0]]])
    first = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])[edges]  # entry offset of every block edge
    ids = (entries >> Q_BITS).astype(np.int64)
    codes = (entries & Q_MAX).astype(np.int64)
    nb = len(starts)
    return [
        encode_codes(
            counts[edges[b] : edges[b + 1]],
            ids[first[b] : first[b + 1]],
            codes[first[b] : first[b + 1]],
            table,
            step,
            position=block_position(first_sequence + b // nb, b % nb, seq_len),
        )  # fmt: skip
        for b in range(len(bounds))
    ]


def block_position(sequence: int, block: int, seq_len: int) -> int:
    """Schema 3: the place a block is coded at (its global number): block ``block`` of global sequence ``sequence``."""
    return sequence * blocks_per_sequence(seq_len) + block


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
    """sha256 over the logical content: every finished shard's attributes and datasets (name, dtype, shape, bytes).

    Equal for caches holding equal data, independent of chunking, write order, writer ranks or interruptions.

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
            for name in DATASETS3 if shard_schema(f.attrs) == 3 else DATASETS:
                dset = f[name]
                digest.update(f"{name}:{dset.dtype.str}:{dset.shape}".encode())
                row = max(1, int(np.prod(dset.shape[1:])))
                for start in range(0, dset.shape[0], max(1, block // row)):
                    stop = start + max(1, block // row)
                    digest.update(np.ascontiguousarray(read_dataset(file, dset, slice(start, stop))).tobytes())
    return digest.hexdigest()


def token_source_fingerprint(tokens_path: Path | str, split: str, sample_rows: int = 16) -> str:
    """A cheap identity of a token file's split: its attributes, shape and ``sample_rows`` evenly spaced rows.

    Args:
        tokens_path: the ``tokens.h5`` written by ``pd-lightning prepare``.
        split: dataset name in it (``train`` or ``val``).
        sample_rows: rows hashed in full.
    """
    from pd_lightning.corpus.prepare import TokenFile  # lazy: corpus.py is the reader of both token layouts

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
