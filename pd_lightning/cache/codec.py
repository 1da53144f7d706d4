"""A compact, exact-id coding of a teacher cache's (id, -log p) entries: ~2.1 B per entry, |error| < 1e-3.

The codec of schema-3 caches (:mod:`pd_lightning.cache.format`: one block per 2048 positions of a sequence, one
:class:`IdTable` per shard; the writer codes the cache's 14-bit codes with :func:`encode_codes`, so schema 3 holds
exactly schema 2's values). The figures below are for its default ``step``; a cache uses ``nlogp_max / 16383``.

A *block* codes the entries of a run of consecutive positions (a few thousand: a reader's window) and decodes on
its own, given the shard's :class:`IdTable`. Row layout as in the cache: ``counts[t]`` entries for position
``t``, in descending probability order, concatenated (CSR without the offsets). The coding:

- **values**: ``q = round(-log p / step)`` (integer codes; ``|error| <= step / 2`` plus float32 rounding, see
  :func:`error_bound`: under 1e-3 for the default ``step = 1.99e-3`` up to 40 nats). The block stores the
  differences of consecutive codes modulo ``2^w`` (``w = 16``, or 32 when a code reaches ``2^15``): inside a
  row, where codes are sorted, these are small non-negative integers (mean ~30 on the demo teacher's
  top-0.95-100 entries); a row's first code is taken relative to the previous row's last one (it wraps).
  Decoding is one cumulative sum of the differences read as signed ``w``-bit integers (every partial sum is a
  code), exact whatever the order of the entries: no error accumulates.
  Stored as byte planes (low byte, high byte).
- **ids**: mapped to ranks through the shard's :class:`IdTable` (ids by descending frequency; ids the table does
  not list follow in increasing id order, so every id in ``[0, V)`` has a rank and the mapping is a bijection),
  then split into the low 5 bits (one plane) and ``min(rank >> 5, 255)`` (one plane); the ranks that reach 255
  there (``rank >= 8160``) keep the rest, ``(rank >> 5) - 255``, in 1-4 byte planes of their own ("escapes").
  The low 5 bits are close to uniform and the second plane carries the skew of the frequency distribution: on
  the demo teacher's entries 0.17 bits above the order-0 entropy of the ranks (a low/high byte split: 0.6).
  The escapes keep wide rank ranges (a real 151k vocabulary) from splitting the skew over independent planes:
  0.4 bits above the entropy on ranks ~ 1/rank over 151,552, against 1.3 for plain byte planes of ``rank >> 5``.
- every plane is one zstd frame (level 1: Huffman-coded literals; levels 3 and 9 found spurious matches and were
  larger on this data) with its content size and a content checksum.

Decoding (:func:`decode_block`) is :func:`decompress_planes` (checks + zstd, about half the time) then
:func:`assemble` (numpy: shifts, a table lookup, one cumulative sum). :func:`assemble_torch` does the second step
in torch, so a loader can ship the planes (4 B per entry) and assemble them on the training device.

Block layout (little-endian)::

    magic "PDE3" | version u8 | rank_lo_bits u8 | rank_ext_planes u8 | value_planes u8
    n_positions u32 | n_entries u64 | n_escaped u64 | vocab_size u32 | step f64 | table_crc u32 | counts_crc u32
    frame_lengths u32 x (2 + rank_ext_planes + value_planes) | header_crc u32 | frames...

``table_crc`` ties the block to its id table, ``counts_crc`` to the counts it was written with and to its place (the
``position`` given to the encoder: the cache passes the block's global number), ``header_crc``
covers the header and every frame has a zstd content checksum: a truncated, corrupt or mismatched block raises a
``ValueError`` naming the problem. Vocabularies up to ``2^31``.
"""

from __future__ import annotations

import struct
import threading
import zlib
from dataclasses import dataclass, field

import numpy as np
import zstandard

MAGIC = b"PDE3"
VERSION = 1
DEFAULT_STEP = 1.99e-3  # -log p step: |error| <= step / 2 + float32 rounding < 1e-3
MAX_VOCAB = 1 << 31
RANK_LO_BITS = 5
ESCAPE = 255  # the high-rank plane's symbol for ranks >= 255 * 32 = 8160: their rest is in the escape planes
ZSTD_LEVEL = 1
_WORKSPACE_MAX = 1 << 22  # blocks up to this many entries decode through reused per-thread scratch arrays
_DENSE_RANKS = 1 << 24  # vocabularies up to this size encode ranks through a dense id -> rank array
_EXTEND_MAX = 1 << 22  # ranks below this decode through one gather (a table of up to 32 MiB, grown on demand)
_FIXED = struct.Struct("<4sBBBBIQQIdII")
_TABLE_FIXED = struct.Struct("<4sBIIII")  # magic, version, vocab_size, n, ids_crc, frame length
TABLE_MAGIC = b"PDT3"
_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def _check_vocab(vocab_size: int) -> int:
    if isinstance(vocab_size, bool) or not 1 <= int(vocab_size) <= MAX_VOCAB or int(vocab_size) != vocab_size:
        raise ValueError(f"vocab_size must be an integer in [1, 2^31], got {vocab_size!r}")
    return int(vocab_size)


@dataclass(frozen=True, eq=False)
class IdTable:
    """A shard's id -> rank map: ``ids`` (distinct, most frequent first) take ranks ``0 .. n-1``; every other id of
    ``[0, vocab_size)`` follows in increasing id order (rank ``n + id - #{table ids < id}``).

    Build one with :func:`build_id_table` from any sample of the shard's ids (e.g. its first chunk: ids the sample
    missed still code exactly, only in more bits); store it with :meth:`to_bytes`.
    """

    vocab_size: int
    ids: np.ndarray  # (n,) int64
    crc: int = field(init=False)
    _sorted: np.ndarray = field(init=False, repr=False)  # (n,) the table's ids, ascending
    _sorted_rank: np.ndarray = field(init=False, repr=False)  # (n,) rank of _sorted[i]
    _gaps: np.ndarray = field(init=False, repr=False)  # (n,) _sorted[i] - i: ids outside the table below _sorted[i]
    _dense: np.ndarray | None = field(init=False, repr=False)  # (V,) uint32 rank of every id (V <= 2^24)
    _extended: np.ndarray = field(init=False, repr=False)  # (R,) id of every rank below R (grown on demand)

    def __post_init__(self) -> None:
        v = _check_vocab(self.vocab_size)
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"IdTable ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(f"IdTable ids must lie in [0, vocab_size={v}), got [{int(ids.min())}, {int(ids.max())}]")
        order = np.argsort(ids, kind="stable")
        srt = ids[order]
        if srt.size > 1 and bool((srt[1:] == srt[:-1]).any()):
            raise ValueError("IdTable ids must be distinct")
        object.__setattr__(self, "vocab_size", v)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "crc", zlib.crc32(ids.astype("<u4").tobytes(), zlib.crc32(struct.pack("<I", v))))
        object.__setattr__(self, "_sorted", srt)
        object.__setattr__(self, "_sorted_rank", order.astype(np.int64))
        object.__setattr__(self, "_gaps", srt - np.arange(srt.size, dtype=np.int64))
        object.__setattr__(self, "_dense", None)
        object.__setattr__(self, "_extended", ids)

    def __len__(self) -> int:
        return int(self.ids.size)

    def ranks(self, ids: np.ndarray) -> np.ndarray:
        """``(E,)`` int64 ids in ``[0, vocab_size)`` -> ``(E,)`` uint32 ranks."""
        n = self.ids.size
        if self.vocab_size <= _DENSE_RANKS:
            if self._dense is None:
                dense = np.arange(self.vocab_size, dtype=np.int64)
                dense -= np.searchsorted(self._sorted, dense)  # ids outside the table: id - #{table ids < id}
                dense += n
                dense[self.ids] = np.arange(n, dtype=np.int64)
                object.__setattr__(self, "_dense", dense.astype(np.uint32))
            return self._dense[ids]
        pos = np.searchsorted(self._sorted, ids)
        hit = pos < n
        hit[hit] = self._sorted[pos[hit]] == ids[hit]
        out = (ids + n - pos).astype(np.uint32)
        out[hit] = self._sorted_rank[pos[hit]]
        return out

    def lookup(self, ranks: np.ndarray, max_rank: int | None = None) -> np.ndarray:
        """``(E,)`` ranks (all ``< vocab_size``) -> ``(E,)`` int64 ids (``max_rank``: ``ranks.max()`` if known)."""
        n = self.ids.size
        if ranks.size == 0:
            return np.zeros(0, np.int64)
        if n == 0:  # the identity map
            return ranks.astype(np.int64)
        top = int(ranks.max()) if max_rank is None else max_rank
        if top < n:
            return self.ids.take(ranks.astype(np.intp, copy=False))
        if top < _EXTEND_MAX:  # one gather from the table extended by the ids it does not list, in id order
            ext = self._extended
            if ext.size <= top:
                size = min(max(2 * ext.size, top + 1, 1 << 12), self.vocab_size)
                j = np.arange(n, size, dtype=np.int64) - n
                ext = np.concatenate([self.ids, j + np.searchsorted(self._gaps, j, side="right")])
                object.__setattr__(self, "_extended", ext)
            return ext.take(ranks.astype(np.intp, copy=False))
        out = np.empty(ranks.shape, np.int64)
        inside = ranks < n
        out[inside] = self.ids.take(ranks[inside].astype(np.intp, copy=False))
        j = ranks[~inside].astype(np.int64) - n
        out[~inside] = j + np.searchsorted(self._gaps, j, side="right")
        return out

    def full_map(self) -> np.ndarray:
        """``(V,)`` int64: the id of every rank (the table extended by every id it does not list, in id order); built
        on first use, for vocabularies up to ``2^22`` (8 B per entry: 1.2 MB at 151,552)."""
        if self._extended.size < self.vocab_size:
            n = self.ids.size
            j = np.arange(n, self.vocab_size, dtype=np.int64) - n
            ext = np.concatenate([self.ids, j + np.searchsorted(self._gaps, j, side="right")])
            object.__setattr__(self, "_extended", ext)
        return self._extended

    def tensors(self, device=None):
        """``(ids, gaps)`` int64 tensors for :func:`assemble_torch`."""
        import torch

        return torch.as_tensor(self.ids, device=device), torch.as_tensor(self._gaps, device=device)

    def to_bytes(self, level: int = 19) -> bytes:
        """Serialised table (zstd of uint32 ids, with the vocabulary size and a checksum); see :meth:`from_bytes`."""
        frame = _compressor(level).compress(self.ids.astype("<u4").tobytes())
        return _TABLE_FIXED.pack(TABLE_MAGIC, VERSION, self.vocab_size, self.ids.size, self.crc, len(frame)) + frame

    @classmethod
    def from_bytes(cls, data: bytes) -> IdTable:
        data = bytes(data)
        if len(data) < _TABLE_FIXED.size:
            raise ValueError(f"id table truncated: {len(data)} bytes, the header alone is {_TABLE_FIXED.size}")
        magic, version, vocab, n, crc, length = _TABLE_FIXED.unpack_from(data)
        if magic != TABLE_MAGIC:
            raise ValueError(f"not an entry-codec id table (magic {magic!r}, expected {TABLE_MAGIC!r})")
        if version != VERSION:
            raise ValueError(f"id table version {version} is not supported (this reader: {VERSION})")
        if len(data) != _TABLE_FIXED.size + length:
            expected = _TABLE_FIXED.size + length
            raise ValueError(f"id table truncated or padded: {len(data)} bytes, header says {expected}")
        raw = _decompress(data[_TABLE_FIXED.size :], 4 * n, "id table")
        table = cls(vocab, np.frombuffer(raw, "<u4").astype(np.int64))
        if table.crc != crc:
            raise ValueError(f"id table checksum mismatch (stored {crc:#010x}, computed {table.crc:#010x})")
        return table


def build_id_table(ids: np.ndarray, vocab_size: int, max_size: int | None = None) -> IdTable:
    """A shard's :class:`IdTable` from a sample of its ids: the ids seen, by descending count (ties: smaller id).

    Args:
        ids: any sample of ids (e.g. the entries of the shard's first chunk); an empty sample gives the identity
            map (rank = id).
        vocab_size: ``V``, up to ``2^31``.
        max_size: keep at most this many ids (the rest take ranks in id order).
    """
    v = _check_vocab(vocab_size)
    ids = np.asarray(ids).reshape(-1).astype(np.int64)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(f"ids must lie in [0, vocab_size={v}), got [{int(ids.min())}, {int(ids.max())}]")
    if v <= _DENSE_RANKS:
        count = np.bincount(ids, minlength=v)
        seen = np.flatnonzero(count)
        count = count[seen]
    else:
        seen, count = np.unique(ids, return_counts=True)
    table = seen[np.argsort(-count, kind="stable")]  # seen is ascending: ties keep the smaller id first
    if max_size is not None:
        table = table[: max(int(max_size), 0)]
    return IdTable(v, table)


def error_bound(step: float = DEFAULT_STEP, max_nlogp: float = 40.0) -> float:
    """Largest ``|decoded - given|`` of a ``-log p`` up to ``max_nlogp``: half a step plus the float32 rounding of
    ``code * step`` (relative ``2^-23``). ``error_bound() = 9.997e-4``; at ``ln 1e6`` (top-p-k caches) 9.966e-4."""
    return step / 2 + max_nlogp * 2.0**-23


def _nbytes(x: int) -> int:
    return (int(x).bit_length() + 7) // 8


def _planes(x: np.ndarray, n: int) -> list[bytes]:
    """The ``n`` low byte planes of an unsigned array."""
    b = x.astype(x.dtype.newbyteorder("<"), copy=False).view(np.uint8).reshape(x.size, x.itemsize)
    return [np.ascontiguousarray(b[:, k]).tobytes() for k in range(n)]


def _counts(counts: np.ndarray) -> np.ndarray:
    c = np.asarray(counts)
    if c.ndim != 1 or (c.size and not np.issubdtype(c.dtype, np.integer)):
        raise ValueError(f"counts must be a 1-D integer array, got shape {c.shape} dtype {c.dtype}")
    if c.size and (int(c.min()) < 0 or int(c.max()) >= 1 << 32):
        raise ValueError(f"counts must lie in [0, 2^32), got [{int(c.min())}, {int(c.max())}]")
    return c


def encode_block(
    counts: np.ndarray,
    ids: np.ndarray,
    nlogp: np.ndarray,
    table: IdTable,
    step: float = DEFAULT_STEP,
    level: int = ZSTD_LEVEL,
) -> bytes:
    """Code the entries of a run of positions into one independently decodable block.

    Args:
        counts: ``(T,)`` entries per position.
        ids: ``(E,)`` ids, ``E = sum(counts)``, row after row (each row in descending probability order for the
            best size; any order decodes exactly).
        nlogp: ``(E,)`` ``-log p`` (``>= 0``; values in ``(-step/2, 0)`` from rounding become 0).
        table: the shard's :class:`IdTable` (gives ``vocab_size``).
        step: the ``-log p`` quantisation step; the decoded values are within ``step / 2`` (+ float32 rounding).
        level: zstd level.

    Raises:
        ValueError: shapes, ids outside ``[0, V)``, non-finite or negative ``-log p``, codes beyond ``2^32``.
    """
    ids = np.asarray(ids).reshape(-1)
    nlogp = np.asarray(nlogp).reshape(-1)
    e = int(_counts(counts).sum(dtype=np.int64))
    if ids.size != e or nlogp.size != e:
        raise ValueError(f"counts sum to {e} entries but ids has {ids.size} and nlogp {nlogp.size}")
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    if e and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    q = np.rint(nlogp.astype(np.float64) / step)  # (E,)
    if e and not np.isfinite(q).all():
        raise ValueError("-log p must be finite (an entry is NaN or inf)")
    if e and (q.min() < 0 or q.max() >= 2.0**31):
        bad = float(nlogp[np.argmin(q)] if q.min() < 0 else nlogp[np.argmax(q)])
        raise ValueError(f"-log p must lie in [0, {step * (2**31 - 1):.4g}] (step {step}), got {bad:.6g}")
    return encode_codes(counts, ids, q.astype(np.int64), table, step, level)


def encode_codes(
    counts: np.ndarray,
    ids: np.ndarray,
    codes: np.ndarray,
    table: IdTable,
    step: float,
    level: int = ZSTD_LEVEL,
    position: int = 0,
) -> bytes:
    """:func:`encode_block` from integer codes: ``-log p = codes * step`` exactly as given (no re-rounding).
    ``position`` (e.g. the block's number in the cache) is folded into the counts checksum: decoding needs the same
    value, so a block moved to another place, even one with equal counts, is refused.

    The cache writer codes the schema-2 quantised values (``q``, ``0 <= q < 2^14``) this way, so a schema-3 cache
    decodes to exactly the values a schema-2 cache of the same teacher holds.
    """
    c = _counts(counts)
    ids = np.asarray(ids).reshape(-1).astype(np.int64, copy=False)
    q = np.asarray(codes).reshape(-1).astype(np.int64, copy=False)
    e = int(c.sum(dtype=np.int64))
    if ids.size != e or q.size != e:
        raise ValueError(f"counts sum to {e} entries but ids has {ids.size} and codes {q.size}")
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    v = table.vocab_size
    if e and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(f"ids must lie in [0, vocab_size={v}), got [{int(ids.min())}, {int(ids.max())}]")
    if e and (int(q.min()) < 0 or int(q.max()) >= 1 << 31):
        raise ValueError(f"codes must lie in [0, 2^31), got [{int(q.min())}, {int(q.max())}]")
    return _encode(c, ids, q, table, step, level, position)


def _counts_crc(c: np.ndarray, position: int) -> int:
    """The checksum tying a block to its rows' counts and to its place (``position``, e.g. the block's number)."""
    return zlib.crc32(c.astype("<u4").tobytes(), zlib.crc32(struct.pack("<Q", int(position) & (2**64 - 1))))


def _encode(
    c: np.ndarray, ids: np.ndarray, q: np.ndarray, table: IdTable, step: float, level: int, position: int = 0
) -> bytes:
    e = q.size
    wide = bool(e) and int(q.max()) >= 1 << 15  # 16-bit differences, read as int16, need codes below 2^15
    vdtype = np.uint32 if wide else np.uint16
    delta = np.diff(q, prepend=0).astype(vdtype)  # modulo 2^w: wraps at row starts
    ranks = table.ranks(ids)  # (E,) uint32
    lo = (ranks & ((1 << RANK_LO_BITS) - 1)).astype(np.uint8)
    hi = ranks >> RANK_LO_BITS
    big = hi >= ESCAPE
    rest = hi[big] - ESCAPE  # (n_escaped,) escaped ranks: (rank >> 5) - 255
    n_ext = _nbytes(int(rest.max())) if rest.size else 0
    planes = [lo.tobytes(), np.minimum(hi, ESCAPE).astype(np.uint8).tobytes(), *_planes(rest, n_ext)]
    planes += _planes(delta, delta.itemsize)
    comp = _compressor(level)
    frames = [comp.compress(p) for p in planes]
    counts_crc = _counts_crc(c, position)
    head = _FIXED.pack(
        MAGIC,
        VERSION,
        RANK_LO_BITS,
        n_ext,
        delta.itemsize,
        c.size,
        e,
        rest.size,
        table.vocab_size,
        float(step),
        table.crc,
        counts_crc,
    ) + struct.pack(f"<{len(frames)}I", *(len(f) for f in frames))
    return b"".join([head, struct.pack("<I", zlib.crc32(head)), *frames])


@dataclass(frozen=True)
class BlockHeader:
    n_positions: int
    n_entries: int
    n_escaped: int  # entries whose rank is >= 8160
    vocab_size: int
    step: float
    table_crc: int
    counts_crc: int
    rank_lo_bits: int
    rank_ext_planes: int  # byte planes of the escaped ranks' (rank >> 5) - 255, each n_escaped long
    value_planes: int
    frame_lengths: tuple[int, ...]
    header_size: int


def read_header(data: bytes | memoryview) -> BlockHeader:
    """Parse and check a block's header (sizes, version, header checksum, total length)."""
    data = memoryview(data)
    if len(data) < _FIXED.size + 4:
        raise ValueError(f"entry block truncated: {len(data)} bytes, shorter than its fixed header ({_FIXED.size + 4})")
    magic, version, lo_bits, n_ext, v_planes, t, e, n_esc, v, step, table_crc, counts_crc = _FIXED.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not an entry block (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"entry block version {version} is not supported (this reader: {VERSION})")
    if lo_bits != RANK_LO_BITS or n_ext > 4 or v_planes not in (2, 4) or n_esc > e or (n_ext == 0) != (n_esc == 0):
        raise ValueError(
            f"entry block header is corrupt (rank bits {lo_bits}, planes {n_ext}/{v_planes}, {n_esc} escapes)"
        )
    n_frames = 2 + n_ext + v_planes
    size = _FIXED.size + 4 * n_frames + 4
    if len(data) < size:
        raise ValueError(f"entry block truncated: {len(data)} bytes, shorter than its header ({size})")
    lengths = struct.unpack_from(f"<{n_frames}I", data, _FIXED.size)
    (crc,) = struct.unpack_from("<I", data, size - 4)
    if zlib.crc32(data[: size - 4]) != crc:
        raise ValueError("entry block header is corrupt (header checksum mismatch)")
    total = size + sum(lengths)
    if len(data) != total:
        what = "truncated" if len(data) < total else "has trailing bytes"
        raise ValueError(f"entry block {what}: {len(data)} bytes, its header says {total}")
    return BlockHeader(t, e, n_esc, v, step, table_crc, counts_crc, lo_bits, n_ext, v_planes, lengths, size)


def _decompress(frame: bytes | memoryview, size: int, what: str) -> bytes:
    try:
        if zstandard.frame_content_size(frame) != size:
            raise ValueError(f"{what} is corrupt: its zstd frame does not hold the {size} bytes the header promises")
        out = _decompressor().decompress(frame)
    except zstandard.ZstdError as err:
        raise ValueError(f"{what} is corrupt: {err}") from err
    if len(out) != size:
        raise ValueError(f"{what} is corrupt: decoded {len(out)} bytes, expected {size}")
    return out


def _decompress_into(frame: memoryview, dest: np.ndarray, what: str) -> None:
    """Decompress a frame of exactly ``dest.size`` bytes into ``dest`` (its checksum verified)."""
    try:
        if zstandard.frame_content_size(frame) != dest.size:
            raise ValueError(
                f"{what} is corrupt: its zstd frame does not hold the {dest.size} bytes the header promises"
            )
        with _decompressor().stream_reader(frame, read_across_frames=False) as reader:
            n = reader.readinto(memoryview(dest)) if dest.size else 0
            tail = reader.read(1)  # reaches the frame's end: the content checksum is checked there
    except zstandard.ZstdError as err:
        raise ValueError(f"{what} is corrupt: {err}") from err
    if n != dest.size or tail:
        raise ValueError(f"{what} is corrupt: decoded {n + len(tail)}+ bytes, expected {dest.size}")


def _workspace(name: str, dtype: type, n: int) -> np.ndarray:
    """A per-thread scratch array of ``n`` elements (grown, never shrunk; its content is garbage)."""
    spaces = _local.__dict__.setdefault("workspaces", {})
    if n > _WORKSPACE_MAX:
        return np.empty(n, dtype)
    buf = spaces.get(name)
    if buf is None or buf.size < n:
        buf = spaces[name] = np.empty(max(n, 1 << 16), dtype)
    return buf[:n]


def decompress_planes(
    data: bytes | memoryview, counts: np.ndarray, table: IdTable, out: np.ndarray | None = None, position: int = 0
) -> tuple[BlockHeader, list[np.ndarray]]:
    """The checks and the zstd part of :func:`decode_block`: the block's header and its uint8 planes.

    Planes, in order: the ranks' low 5 bits ``(E,)``; ``min(rank >> 5, 255)`` ``(E,)``; for the ranks escaped
    there (255), ``rank_ext_planes`` byte planes of ``(rank >> 5) - 255`` ``(n_escaped,)`` (least significant
    first); ``value_planes`` byte planes of the wrapped code differences ``(E,)``. The integer assembly
    (:func:`assemble`, or :func:`assemble_torch` on the training device) turns them into entries. The planes
    are views of ``out`` (uint8, at least ``(value_planes + 2) * E + rank_ext_planes * n_escaped`` bytes) when
    given, else of a new array.

    Raises:
        ValueError: truncated or corrupt block, counts or table other than the block's.
    """
    h = read_header(data)
    c = _counts(counts)
    e = int(c.sum(dtype=np.int64))
    if c.size != h.n_positions or e != h.n_entries:
        raise ValueError(
            f"counts do not match the entry block: {c.size} positions / {e} entries given, "
            f"the block holds {h.n_positions} / {h.n_entries}"
        )
    if _counts_crc(c, position) != h.counts_crc:
        raise ValueError(
            "the entry block is not the one of these rows (same total, other counts, or a block of another place: "
            "counts/position checksum mismatch)"
        )
    if table.crc != h.table_crc or table.vocab_size != h.vocab_size:
        raise ValueError(
            f"the id table (vocab_size {table.vocab_size}, crc {table.crc:#010x}) is not the block's "
            f"(vocab_size {h.vocab_size}, crc {h.table_crc:#010x})"
        )
    if e == 0:
        return h, [np.zeros(0, np.uint8) for _ in h.frame_lengths]  # (no escapes either: n_escaped <= E)
    sizes = [h.n_escaped if 2 <= k < 2 + h.rank_ext_planes else e for k in range(len(h.frame_lengths))]
    total = sum(sizes)
    if out is None:
        out = np.empty(total, np.uint8)
    elif out.dtype != np.uint8 or out.ndim != 1 or out.size < total or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous 1-D uint8 array of at least {total} bytes")
    mv = memoryview(data)
    off = pos = 0
    off = h.header_size
    planes = []
    for k, (length, size) in enumerate(zip(h.frame_lengths, sizes)):
        planes.append(out[pos : pos + size])
        _decompress_into(mv[off : off + length], planes[-1], f"entry block plane {k}")
        off += length
        pos += size
    return h, planes


def decode_block(
    data: bytes | memoryview, counts: np.ndarray, table: IdTable, logprobs: bool = False, position: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A block -> ``ids`` ``(E,)`` int64 (exact) and ``nlogp`` ``(E,)`` float32 (``-log p``, within ``step / 2``;
    with ``logprobs``, ``log p`` itself).

    Args:
        data: the block's bytes (:func:`encode_block`).
        counts: ``(T,)`` entries per position, as given to :func:`encode_block` (checked against the block).
        table: the shard's :class:`IdTable` (checked against the block).

    Raises:
        ValueError: truncated or corrupt block, counts or table other than the block's.
    """
    h = read_header(data)
    n = (h.value_planes + 2) * h.n_entries + h.rank_ext_planes * h.n_escaped
    # the planes go to a per-thread buffer: fresh ~MB arrays per call cost page faults (glibc returns freed heap
    # tops to the OS) that took as long as the decompression on the 2-core test machine
    h, planes = decompress_planes(data, counts, table, out=_workspace("planes", np.uint8, n), position=position)
    return assemble(h, planes, table, logprobs)


def assemble(
    h: BlockHeader, planes: list[np.ndarray], table: IdTable, logprobs: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`decompress_planes`' planes -> ``ids`` ``(E,)`` int64 and ``nlogp`` ``(E,)`` float32 (numpy; with
    ``logprobs``, ``log p = -nlogp`` instead, exactly: the product with the negated step)."""
    e = h.n_entries
    if e == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    import torch

    # ranks: low 5 bits | the plane above (| the escaped ranks' planes). Temporaries live in per-thread buffers.
    # Vocabularies up to 2^22 (all real ones): the ranks are built as indices and mapped by one gather from the table
    # extended to every rank (no max pass; an out-of-range rank, a corrupt block, fails the gather's bounds check).
    direct = h.vocab_size <= _EXTEND_MAX
    esc = h.n_escaped > 0  # ranks up to 2^31 (else < 8160)
    if direct:
        ranks = _workspace("index", np.intp, e)
    else:
        ranks = _workspace("ranks32" if esc else "ranks16", np.uint32 if esc else np.uint16, e)
    np.left_shift(planes[1], RANK_LO_BITS, out=ranks, dtype=ranks.dtype)
    np.bitwise_or(ranks, planes[0], out=ranks)
    if esc:
        where = np.flatnonzero(planes[1] == ESCAPE)
        if where.size != h.n_escaped:
            raise ValueError(f"entry block is corrupt: {where.size} escaped ranks, the header says {h.n_escaped}")
        rest = planes[2].astype(ranks.dtype)
        for k in range(1, h.rank_ext_planes):
            rest |= planes[2 + k].astype(ranks.dtype) << (8 * k)
        rest += ESCAPE
        rest <<= RANK_LO_BITS
        rest |= planes[0][where]
        ranks[where] = rest
    if direct:
        try:
            ids = table.full_map().take(ranks)
        except IndexError as err:
            raise ValueError(f"entry block is corrupt: a rank is outside the vocabulary {h.vocab_size}") from err
    else:
        max_rank = int(ranks.max())
        if max_rank >= h.vocab_size:
            raise ValueError(f"entry block is corrupt: a rank {max_rank} is outside the vocabulary {h.vocab_size}")
        index = _workspace("index", np.intp, e)
        np.copyto(index, ranks)
        ids = table.lookup(index, max_rank)
    # values: wrapped code differences -> one cumulative sum modulo 2^w
    vp = planes[2 + h.rank_ext_planes :]
    delta = _workspace(f"delta{h.value_planes}", np.uint16 if h.value_planes == 2 else np.uint32, e)
    np.left_shift(vp[-1], 8, out=delta, dtype=delta.dtype)
    np.bitwise_or(delta, vp[-2], out=delta)
    for k in range(h.value_planes - 3, -1, -1):
        np.left_shift(delta, 8, out=delta)
        np.bitwise_or(delta, vp[k], out=delta)
    # the differences modulo 2^w read as signed: every partial sum is a code (< 2^(w-1)), so int32 sums are exact
    codes = _workspace("codes", np.int32, e)
    # torch's CPU cumsum is 3-6x numpy's (one thread); the result is written into the workspace
    torch.cumsum(torch.from_numpy(delta.view(np.int16 if h.value_planes == 2 else np.int32)), 0, dtype=torch.int32,
                 out=torch.from_numpy(codes))  # fmt: skip
    values = np.multiply(codes, np.float32(-h.step if logprobs else h.step), dtype=np.float32)
    return ids, values


def assemble_torch(h: BlockHeader, planes: list, table_ids, table_gaps) -> tuple:
    """:func:`assemble` in torch, for the device that trains: ``planes`` the uint8 planes of
    :func:`decompress_planes` as tensors, ``table_ids`` / ``table_gaps`` the int64 tensors of
    :meth:`IdTable.tensors`, all on one device.

    Returns ``ids`` ``(E,)`` int64 and ``nlogp`` ``(E,)`` float32 on that device, without a host synchronisation
    (the block was checked when its planes were decompressed).
    """
    import torch

    lo = planes[0].long()
    ranks = planes[1].long() << RANK_LO_BITS | lo
    if h.n_escaped:
        rest = planes[2].long()
        for k in range(1, h.rank_ext_planes):
            rest |= planes[2 + k].long() << (8 * k)
        where = planes[1] == ESCAPE
        full = torch.zeros_like(ranks).masked_scatter_(where, rest)
        ranks = torch.where(where, (full + ESCAPE) << RANK_LO_BITS | lo, ranks)
    n = table_ids.numel()
    if n:
        j = (ranks - n).clamp(min=0)
        outside = j + torch.searchsorted(table_gaps, j, right=True)
        ids = torch.where(ranks < n, table_ids[ranks.clamp(max=n - 1)], outside)
    else:
        ids = ranks
    first = 2 + h.rank_ext_planes
    delta = planes[first].long()
    for k in range(1, h.value_planes):
        delta |= planes[first + k].long() << (8 * k)
    codes = delta.cumsum(0) & ((1 << (8 * h.value_planes)) - 1)  # int64: no overflow below 2^31 entries
    return ids, codes.float() * h.step
