"""Reading a teacher cache: a map-style ``Dataset`` over the sequences of its finished shards.

The reader takes the union of the cache's indexes (see :mod:`pd_lightning.cache.format`), i.e. the finished
shards of any number of writer ranks, and checks every shard's header (it exists, opens, is complete and of the
index's spec). Only small per-shard tables are loaded, lazily; HDF5 handles are opened lazily, once per process, so
the dataset works in DataLoader workers started by fork or spawn (handles are never pickled or shared).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from pd_lightning.cache.format import (
    SHARD_RE,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheLayout,
    CacheMismatchError,
    CacheSpec,
    blocks_per_sequence,
    decode,
    pad_entries,
    read_attrs,
    read_dataset,
    read_layout,
    schema1_message,
    shard_schema,
)
from pd_lightning.distill.target import (
    TEACHER_ENTROPY,
    TEACHER_IDS,
    TEACHER_LOGPROBS,
    TEACHER_STD,
    TEACHER_TAIL,
    power_sum_key,
)

# HDF5 raw-data chunk cache per open file: holds the chunks a 2048-position window touches.
_CHUNK_CACHE_BYTES = 4 << 20
# Open shard files per process (least recently used closed first): a shuffled epoch over a 100B-token cache touches
# ~12k shards, more than the usual limit of 1024 open files.
MAX_OPEN_SHARDS = 32
RESUME = "rerun `pd-lightning predict` with the same arguments to finish it"


class _Shard(NamedTuple):
    file: h5py.File
    tokens: h5py.Dataset
    counts: h5py.Dataset
    entries: h5py.Dataset  # schema 2: packed entries; schema 3: the coded blocks (bytes)
    std: h5py.Dataset
    entropy: h5py.Dataset
    tail: h5py.Dataset
    power_sum: h5py.Dataset
    offsets: np.ndarray  # (S_j + 1,) schema 2: entry offset of each sequence; schema 3: byte offset of each block
    table: Any = None  # schema 3: the shard's IdTable


def open_layout(path: str | Path) -> CacheLayout:
    """The layout of a cache folder, refusing a path that is not a cache folder (one clear message each)."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"teacher cache folder {path} does not exist")
    if not path.is_dir():
        raise CacheError(f"{path} is a file, not a teacher cache folder (pass the folder `pd-lightning predict` wrote)")
    layout = read_layout(path)
    if layout is None:
        if any(SHARD_RE.match(p.name[: -len(".tmp")]) for p in path.glob("shard-*.h5.tmp")):
            raise CacheIncompleteError(f"teacher cache {path} has no finished shard yet; {RESUME}")
        raise CacheError(f"no teacher cache in {path} (no index.json or index-*-of-*.json)")
    for p in path.iterdir():  # a finished shard that no index names must at least belong to this cache
        match = SHARD_RE.match(p.name)
        if match and int(match[1]) not in layout.shards:
            try:
                spec = CacheSpec.from_attrs(read_attrs(p), p)
            except CacheError:
                continue  # being written or adopted by a running predict
            if spec != layout.spec:
                raise CacheMismatchError(
                    f"{path} mixes two caches: {p.name} was written with other parameters than the index "
                    f"({spec.describe_difference(layout.spec)}); keep one cache per folder"
                )
    return layout


class TeacherCache(Dataset):
    """The finished shards of a teacher cache; ``cache[i]`` is the ``i``-th finished sequence.

    For a complete cache ``cache[i]`` is global sequence ``i``. With ``allow_partial`` a cache still being written
    (or interrupted) is read over the sequences of the shards finished when it was opened, in global order
    (:attr:`sequences` maps positions to global indices).

    Items (``L = seq_len``, ``K`` = :attr:`max_entries`, ``G`` stored gammas): ``input_ids`` ``(L,)`` int64,
    ``labels`` ``(L,)`` int64, ``teacher_ids`` ``(L, K)`` int64 (padding 0), ``teacher_logprobs`` ``(L, K)``
    float32 (padding ``-inf``), ``teacher_std``, ``teacher_entropy``, ``teacher_tail`` ``(L,)`` float32 and one
    ``teacher_power_sum@<gamma>`` ``(L,)`` float32 per stored gamma. ``K`` is fixed per cache, so batches
    collate with the default collate function. Rows that cover the whole vocabulary (``Full``) are renormalised
    to sum to 1. Non-finite statistics raise :class:`CacheCorruptError` naming the shard and sequence.

    Args:
        path: the cache folder.
        allow_partial: read a cache whose shards are not all finished (refused by default).
    """

    def __init__(self, path: str | Path, allow_partial: bool = False) -> None:
        self.path = Path(path)
        layout = open_layout(self.path)
        if not layout.complete and not allow_partial:
            raise CacheIncompleteError(
                f"teacher cache {self.path} is unfinished ({layout.finished_sequences} of "
                f"{layout.spec.num_sequences} sequences in finished shards); {RESUME}, or pass "
                "--data.allow_partial true to train on the finished part"
            )
        if not layout.shards:
            raise CacheIncompleteError(f"teacher cache {self.path} has no finished shard yet; {RESUME}")
        self.spec: CacheSpec = layout.spec
        self._pid: int | None = None
        self._shards: OrderedDict[int, _Shard] = OrderedDict()
        self._use(layout)

    def _use(self, layout: CacheLayout) -> None:
        """Read the finished shards of ``layout`` (checked here)."""
        self.layout = layout
        self.complete = layout.complete
        for j in sorted(layout.shards):
            self._check_header(j)
        self.shard_ids = np.array(sorted(layout.shards), dtype=np.int64)  # (J,)
        self.sequences: np.ndarray | None = None  # (n,) global index of each position, None = identity
        if not layout.complete:
            self.sequences = np.concatenate([np.arange(*self.spec.shard_range(int(j))) for j in self.shard_ids])
        max_counts = [int(r.get("max_count", 0)) for r in layout.shards.values()]
        self.max_entries = self.spec.max_entries or max(max(max_counts), 1)

    def use_shards(self, shards: list[int], whose: str = "another rank's") -> None:
        """Read exactly the finished shards ``shards``: the snapshot that another rank or a checkpoint took of a cache
        being written (the positions -> sequences map, the length and ``K`` then agree with it).

        Args:
            shards: shard numbers, all finished (now, if not when this process opened the cache).
            whose: whose snapshot it is, for the error message.

        Raises:
            CacheIncompleteError: a shard of ``shards`` is not finished in this folder.
        """
        wanted = sorted({int(j) for j in shards})
        if wanted == self.shard_ids.tolist():
            return
        layout = self.layout
        if not wanted or any(j not in layout.shards for j in wanted):
            layout = open_layout(self.path)  # the cache has grown since this process opened it
            if layout.spec != self.spec:
                raise CacheMismatchError(
                    f"teacher cache {self.path} was replaced by another cache while being read "
                    f"({layout.spec.describe_difference(self.spec)}); keep one cache per folder"
                )
            missing = [j for j in wanted if j not in layout.shards]
            if missing or not wanted:
                raise CacheIncompleteError(
                    f"teacher cache {self.path}: {whose} snapshot reads shard(s) {missing[:5]} (of {len(wanted)}), "
                    "which are not finished in this folder; read the folder that snapshot was taken of"
                )
        self.close()
        self._use(CacheLayout(self.path, self.spec, {j: layout.shards[j] for j in wanted}, layout.final))

    def _check_header(self, j: int) -> None:
        file = self.layout.file(j)
        attrs = read_attrs(file)
        try:
            spec = CacheSpec.from_attrs(attrs, file)
        except CacheMismatchError as err:
            if shard_schema(attrs) == 1:
                raise CacheMismatchError(schema1_message(self.path)) from err
            raise
        if shard_schema(attrs) != self.layout.schema:
            raise CacheMismatchError(
                f"{file} is a schema-{shard_schema(attrs)} shard in a schema-{self.layout.schema} cache ({self.path}); "
                "a cache folder holds one schema: delete the shard and rerun `pd-lightning predict` with the same "
                "arguments, or keep the caches in separate folders"
            )
        if spec != self.spec:
            raise CacheMismatchError(
                f"{file} was written with other parameters than {self.path}'s index "
                f"({spec.describe_difference(self.spec)}); keep one cache per folder"
            )
        start, stop = self.spec.shard_range(j)
        if not attrs.get("complete", False) or int(attrs.get("shard", -1)) != j:
            raise CacheCorruptError(f"teacher cache shard {file} is not a finished shard {j}; delete it and {RESUME}")
        if int(attrs["num_shard_sequences"]) != stop - start:
            raise CacheCorruptError(f"teacher cache shard {file} holds {attrs['num_shard_sequences']} sequences, "
                                    f"expected {stop - start}; delete it and {RESUME}")  # fmt: skip

    # ----------------------------------------------------------------------------------------- metadata
    @property
    def num_sequences(self) -> int:
        return self.spec.num_sequences

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def files(self) -> list[Path]:
        """The finished shard files read."""
        return [self.layout.file(int(j)) for j in self.shard_ids]

    @property
    def meta(self) -> dict[str, Any]:
        """The cache's metadata: the spec's fields (``processor`` parsed from JSON), shard count, ``K``."""
        meta = dict(self.spec.__dict__)
        meta["processor"] = json.loads(self.spec.processor)
        meta.update(shards=len(self.shard_ids), max_entries=self.max_entries, path=str(self.path))
        return meta

    def check_compatible(
        self, vocab_size: int | None = None, tokenizer_fingerprint: str | None = None, seq_len: int | None = None
    ) -> None:
        """Refuse a student/data configuration this cache does not fit (``None`` skips a check).

        Args:
            vocab_size: the student's vocabulary size; must be ``>=`` the teacher's (padding allowed).
            tokenizer_fingerprint: the student data's tokenizer fingerprint; must be equal.
            seq_len: the training sequence length; must be equal.
        """
        problems = []
        if vocab_size is not None and vocab_size < self.spec.vocab_size:
            problems.append(f"student vocab_size={vocab_size} < teacher cache vocab_size={self.spec.vocab_size}")
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != self.spec.tokenizer_fingerprint:
            problems.append(
                f"tokenizer_fingerprint {tokenizer_fingerprint!r} != cache's {self.spec.tokenizer_fingerprint!r}"
            )
        if seq_len is not None and seq_len != self.spec.seq_len:
            problems.append(f"seq_len={seq_len} != cache's seq_len={self.spec.seq_len}")
        if problems:
            raise CacheMismatchError(f"teacher cache {self.path} does not fit: " + "; ".join(problems))

    # ----------------------------------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self.spec.num_sequences if self.sequences is None else len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"position {i} out of range [0, {len(self)})")
        return self.read(int(i) if self.sequences is None else int(self.sequences[i]))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _shards=OrderedDict())  # h5py handles never cross a process boundary
        return state

    def _shard(self, j: int) -> _Shard:
        if self._pid != os.getpid():  # a forked child must not use its parent's handles
            self._pid, self._shards = os.getpid(), OrderedDict()
        shard = self._shards.get(j)
        if shard is not None:
            self._shards.move_to_end(j)
        else:
            if len(self._shards) >= MAX_OPEN_SHARDS:
                self._shards.popitem(last=False)[1].file.close()
            path = self.layout.file(j)
            try:
                f = h5py.File(path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
            except OSError as err:
                raise CacheCorruptError(f"cannot open cache shard {path} (truncated or not HDF5): {err}") from err
            try:
                if self.layout.schema == 2:
                    offsets, table, entries = read_dataset(path, f["sequence_offsets"]), None, f["entries"]
                else:
                    from pd_lightning.cache.codec import IdTable

                    offsets, entries = read_dataset(path, f["block_offsets"]), f["blocks"]
                    table = IdTable.from_bytes(read_dataset(path, f["id_table"]).tobytes())
            except (KeyError, ValueError) as err:
                f.close()
                raise CacheCorruptError(f"cache shard {path} is corrupt: {err}; delete it and {RESUME}") from err
            shard = _Shard(f, f["tokens"], f["counts"], entries, f["std"], f["entropy"], f["tail"],
                           f["power_sum"], offsets, table)  # fmt: skip
            self._shards[j] = shard
        return shard

    def read(self, i: int, start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
        """Positions ``[start, stop)`` of global sequence ``i`` (the fast path for windows); keys as ``cache[i]``.

        Args:
            i: global sequence index (must lie in a finished shard).
            start: first position.
            stop: end position (default ``seq_len``).
        """
        i, length = int(i), self.spec.seq_len
        stop = length if stop is None else stop
        if not 0 <= i < self.spec.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.spec.num_sequences})")
        if not 0 <= start < stop <= length:
            raise IndexError(f"positions [{start}, {stop}) out of range [0, {length}]")
        j, r = divmod(i, self.spec.sequences_per_shard)
        if j not in self.layout.shards:
            raise IndexError(f"sequence {i} is in shard {j}, which is not finished")
        shard = self._shard(j)
        base = r * length
        try:
            tokens = shard.tokens[r, start : stop + 1]  # (W + 1,)
            if shard.table is None:
                counts = shard.counts[base : base + stop]  # from the sequence start: the prefix gives the offset
                first = int(shard.offsets[r]) + int(counts[:start].sum(dtype=np.int64))
                counts = counts[start:]  # (W,)
                entries = shard.entries[first : first + int(counts.sum(dtype=np.int64))]  # (E_w,)
            else:
                counts, ids, logprobs = self._read_blocks(shard, j, i, r, start, stop)
            stats = {
                TEACHER_STD: shard.std[base + start : base + stop],
                TEACHER_ENTROPY: shard.entropy[base + start : base + stop],
                TEACHER_TAIL: shard.tail[base + start : base + stop],
            }
            if shard.power_sum.shape[1]:
                power = shard.power_sum[base + start : base + stop]  # (W, G)
                for g, gamma in enumerate(self.spec.power_gammas):
                    stats[power_sum_key(gamma)] = power[:, g]
        except OSError as err:
            raise CacheCorruptError(f"cache shard {self.layout.file(j)} is corrupt (sequence {i}): {err}") from err
        for name, value in stats.items():
            if not np.isfinite(value).all():
                raise CacheCorruptError(
                    f"cache shard {self.layout.file(j)} holds a non-finite teacher statistic ({name}) in sequence {i}; "
                    f"delete the shard and {RESUME}"
                )
        if shard.table is None:
            ids, logprobs = decode(counts, entries, self.max_entries, self.spec.nlogp_max)
        else:
            ids, logprobs = pad_entries(counts, ids, logprobs, self.max_entries)
        full = counts.astype(np.int64) == self.spec.vocab_size  # rows covering the whole vocabulary: sum to 1
        if full.any():
            rows = logprobs[full].astype(np.float64)
            top = rows.max(-1, keepdims=True)
            logprobs[full] = (rows - top - np.log(np.exp(rows - top).sum(-1, keepdims=True))).astype(np.float32)
        tokens = torch.from_numpy(tokens.astype(np.int64))
        item = {
            "input_ids": tokens[:-1],
            "labels": tokens[1:].clone(),  # its own storage: a consumer may mask labels in place
            TEACHER_IDS: torch.from_numpy(ids),
            TEACHER_LOGPROBS: torch.from_numpy(logprobs),
        }
        item.update({k: torch.from_numpy(v.astype(np.float32)) for k, v in stats.items()})
        return item

    def _read_blocks(
        self, shard: _Shard, j: int, i: int, r: int, start: int, stop: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Schema 3: ``counts`` ``(W,)``, flat ``ids`` and ``logprobs`` of positions ``[start, stop)`` of row ``r``."""
        from pd_lightning.cache.codec import decode_block
        from pd_lightning.cache.format import BLOCK_POSITIONS

        length = self.spec.seq_len
        nb = blocks_per_sequence(length)
        b0, b1 = start // BLOCK_POSITIONS, (stop - 1) // BLOCK_POSITIONS + 1  # blocks [b0, b1) of the sequence
        p0, p1 = b0 * BLOCK_POSITIONS, min(b1 * BLOCK_POSITIONS, length)  # the positions they cover
        counts = shard.counts[r * length + p0 : r * length + p1]  # (p1 - p0,)
        offsets = shard.offsets[r * nb + b0 : r * nb + b1 + 1]  # (b1 - b0 + 1,) byte offsets
        data = shard.entries[int(offsets[0]) : int(offsets[-1])]  # one read of the blocks' bytes
        view = memoryview(data)
        ids, logprobs = [], []
        for b in range(b0, b1):
            a = b * BLOCK_POSITIONS - p0
            c = counts[a : a + BLOCK_POSITIONS]
            lo, hi = int(offsets[b - b0] - offsets[0]), int(offsets[b - b0 + 1] - offsets[0])
            try:
                block_ids, block_logprobs = decode_block(
                    view[lo:hi], c, shard.table, logprobs=True, position=i * nb + b
                )
            except ValueError as err:
                raise CacheCorruptError(
                    f"cache shard {self.layout.file(j)} is corrupt (sequence {i}, entry block {b}): {err}; delete the "
                    f"shard and {RESUME}"
                ) from err
            ids.append(block_ids)
            logprobs.append(block_logprobs)
        ids_flat = ids[0] if len(ids) == 1 else np.concatenate(ids)
        lp_flat = logprobs[0] if len(logprobs) == 1 else np.concatenate(logprobs)
        skip = int(counts[: start - p0].sum(dtype=np.int64))  # entries of the first block before the window
        counts = counts[start - p0 : stop - p0]
        keep = slice(skip, skip + int(counts.sum(dtype=np.int64)))
        return counts, ids_flat[keep], lp_flat[keep]

    def close(self) -> None:
        """Close this process's file handles."""
        if self._pid == os.getpid():
            for shard in self._shards.values():
                shard.file.close()
        self._shards = OrderedDict()
