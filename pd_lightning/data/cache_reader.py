"""Reading a teacher cache: a map-style ``Dataset`` over the global sequence indices of all shards.

Only small per-sequence tables are loaded at construction; HDF5 handles are opened lazily, once per process,
so the dataset works in DataLoader workers started by fork or spawn (handles are never pickled or shared).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from pd_lightning.data.cache_format import (
    SHARD_RE,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheSpec,
    decode,
    read_attrs,
    read_dataset,
    shard_name,
    shard_sequences,
)
from pd_lightning.distill.target import TEACHER_ENTROPY, TEACHER_IDS, TEACHER_LOGPROBS, TEACHER_STD

# HDF5 raw-data chunk cache per open file: holds the chunks a 2048-position window touches.
_CHUNK_CACHE_BYTES = 4 << 20


class _Shard(NamedTuple):
    file: h5py.File
    tokens: h5py.Dataset
    counts: h5py.Dataset
    entries: h5py.Dataset
    std: h5py.Dataset
    entropy: h5py.Dataset


def list_shards(path: Path) -> list[Path]:
    """The shard files of a cache folder, checked to form one complete set ``0..world-1``.

    Raises:
        CacheIncompleteError: no shard, or a missing one (an interrupted ``predict``).
        CacheError: shards of several world sizes.
    """
    if not path.is_dir():
        raise CacheError(f"teacher cache folder {path} does not exist")
    found = {(int(m[1]), int(m[2])) for m in (SHARD_RE.match(p.name) for p in path.iterdir()) if m}
    parts = sorted(p.name for p in path.glob("shard-*.parts"))
    resume = "rerun `pd-lightning predict` with the same arguments to resume"
    if not found:
        if parts:
            raise CacheIncompleteError(f"teacher cache {path} is unfinished (only {', '.join(parts)}); {resume}")
        raise CacheError(f"no teacher cache shards (shard-*-of-*.h5) in {path}")
    worlds = sorted({w for _, w in found})
    if len(worlds) > 1:
        raise CacheError(f"{path} mixes shards written with world sizes {worlds}; delete the stale ones")
    world = worlds[0]
    missing = [shard_name(r, world) for r in range(world) if (r, world) not in found]
    if missing:
        raise CacheIncompleteError(f"teacher cache {path} lacks {', '.join(missing)}; {resume}")
    return [path / shard_name(r, world) for r in range(world)]


class TeacherCache(Dataset):
    """All shards of a teacher cache, indexed by global sequence index.

    ``cache[i]`` is a dict of tensors for sequence ``i`` (``L = seq_len``, ``K`` = :attr:`max_entries`):
    ``input_ids`` ``(L,)`` int64, ``labels`` ``(L,)`` int64, ``teacher_ids`` ``(L, K)`` int64 (padding 0),
    ``teacher_logprobs`` ``(L, K)`` float32 (padding ``-inf``), ``teacher_std`` and ``teacher_entropy``
    ``(L,)`` float32. ``K`` is fixed per cache, so batches collate with the default collate function.

    Args:
        path: the cache folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.files = list_shards(self.path)
        specs, offsets, index, max_counts = [], [], [], []
        for file in self.files:
            attrs = read_attrs(file)
            if not attrs.get("complete", False):
                raise CacheIncompleteError(
                    f"teacher cache shard {file} is incomplete (never finalised); "
                    "rerun `pd-lightning predict` with the same arguments to resume"
                )
            specs.append(CacheSpec.from_attrs(attrs, file))
            max_counts.append(int(attrs["max_count"]))
            with h5py.File(file, "r") as f:
                index.append(read_dataset(file, f["sequence_index"]))
                offsets.append(read_dataset(file, f["sequence_offsets"]))
        for file, spec in zip(self.files[1:], specs[1:]):
            if spec != specs[0]:
                raise CacheMismatchError(f"{file} differs from {self.files[0]}: {spec.describe_difference(specs[0])}")
        self.spec = specs[0]
        self._offsets = offsets  # per shard (S_s + 1,) entry offset of each sequence
        n, world = self.spec.num_sequences, len(self.files)
        self._shard_of: np.ndarray | None = np.full(n, -1, dtype=np.int32)  # (N,) shard holding each sequence
        self._row_of: np.ndarray | None = np.zeros(n, dtype=np.int64)  # (N,) its row in that shard
        for s, (file, idx) in enumerate(zip(self.files, index)):
            if idx.size and (idx.min() < 0 or idx.max() >= n or (self._shard_of[idx] >= 0).any()):
                raise CacheCorruptError(f"{file}: sequence_index out of range or duplicated across shards")
            self._shard_of[idx] = s
            self._row_of[idx] = np.arange(len(idx))
        if (self._shard_of < 0).any():
            raise CacheIncompleteError(f"teacher cache {self.path} lacks {(self._shard_of < 0).sum()} of {n} sequences")
        if all(np.array_equal(idx, shard_sequences(n, s, world)) for s, idx in enumerate(index)):
            self._shard_of = self._row_of = None  # the writers' partition: i -> shard i % world, row i // world
        self.max_entries = self.spec.max_entries or max(max(max_counts), 1)
        self._pid: int | None = None
        self._shards: dict[int, _Shard] = {}

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
    def meta(self) -> dict[str, Any]:
        """The cache's metadata: the spec's fields (``processor`` parsed from JSON), world size, ``K``."""
        meta = dict(self.spec.__dict__)
        meta["processor"] = json.loads(self.spec.processor)
        meta.update(world_size=len(self.files), max_entries=self.max_entries, path=str(self.path))
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
        return self.spec.num_sequences

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.read(i)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_pid=None, _shards={})  # h5py handles never cross a process boundary
        return state

    def _shard(self, s: int) -> _Shard:
        if self._pid != os.getpid():  # a forked child must not use its parent's handles
            self._pid, self._shards = os.getpid(), {}
        shard = self._shards.get(s)
        if shard is None:
            f = h5py.File(self.files[s], "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
            shard = _Shard(f, f["tokens"], f["counts"], f["entries"], f["std"], f["entropy"])
            self._shards[s] = shard
        return shard

    def read(self, i: int, start: int = 0, stop: int | None = None) -> dict[str, torch.Tensor]:
        """Positions ``[start, stop)`` of sequence ``i`` (the fast path for windows); keys as ``cache[i]``.

        Args:
            i: global sequence index.
            start: first position.
            stop: end position (default ``seq_len``).
        """
        i, length = int(i), self.spec.seq_len
        stop = length if stop is None else stop
        if not 0 <= i < self.spec.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.spec.num_sequences})")
        if not 0 <= start < stop <= length:
            raise IndexError(f"positions [{start}, {stop}) out of range [0, {length}]")
        if self._shard_of is None:
            s, r = i % len(self.files), i // len(self.files)
        else:
            s, r = int(self._shard_of[i]), int(self._row_of[i])
        shard = self._shard(s)
        base = r * length
        try:
            tokens = shard.tokens[r, start : stop + 1]  # (W + 1,)
            counts = shard.counts[base : base + stop]  # from the sequence start: the prefix gives the offset
            first = int(self._offsets[s][r]) + int(counts[:start].sum(dtype=np.int64))
            counts = counts[start:]  # (W,)
            entries = shard.entries[first : first + int(counts.sum(dtype=np.int64))]  # (E_w,)
            std = shard.std[base + start : base + stop]
            entropy = shard.entropy[base + start : base + stop]
        except OSError as err:
            raise CacheCorruptError(f"cache shard {self.files[s]} is corrupt (sequence {i}): {err}") from err
        ids, logprobs = decode(counts, entries, self.max_entries)
        tokens = torch.from_numpy(tokens.astype(np.int64))
        return {
            "input_ids": tokens[:-1],
            "labels": tokens[1:].clone(),  # its own storage: a consumer may mask labels in place
            TEACHER_IDS: torch.from_numpy(ids),
            TEACHER_LOGPROBS: torch.from_numpy(logprobs),
            TEACHER_STD: torch.from_numpy(std.astype(np.float32)),
            TEACHER_ENTROPY: torch.from_numpy(entropy.astype(np.float32)),
        }

    def close(self) -> None:
        """Close this process's file handles."""
        if self._pid == os.getpid():
            for shard in self._shards.values():
                shard.file.close()
        self._shards = {}
