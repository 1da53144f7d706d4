"""Writing one rank's shard of a teacher cache: resumable, crash-safe, optionally in a background thread.

Crash safety: an HDF5 file killed mid-write may be unopenable, so the live state is never an HDF5 file. Whole
sequences are buffered and committed every ``commit_sequences`` sequences as an immutable part file
(``shard-R-of-W.parts/part-NNNNNN.npz``: written to ``*.tmp``, fsynced, atomically renamed). A SIGKILL at any
moment leaves committed parts plus at most one ``*.tmp``, which the next run deletes before continuing with the
sequences no part holds (progress is lost back to the last commit). :meth:`CacheWriter.finalize` merges the
parts, sorted by global sequence index, into ``shard-R-of-W.h5.tmp``, writes ``complete=True`` last, fsyncs and
renames it into place, then deletes the parts. So the final shard depends only on the data, never on where
runs were interrupted, and a shard file under its final name is complete. Cost: the data is written twice
(parts, then the shard) and the parts need as much disk as the shard until the merge ends.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from pd_lightning.data.cache_format import (
    SHARD_RE,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheSpec,
    EncodedSequences,
    count_dtype,
    encode,
    entry_dtype,
    read_attrs,
    shard_name,
    shard_sequences,
)
from pd_lightning.distill.target import SparseTarget

log = logging.getLogger(__name__)

PARTS_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.parts$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class CacheWriter:
    """Writes the shard of rank ``rank`` (sequences ``rank, rank + world_size, ...``) into ``cache_dir``.

    Feed whole sequences with :meth:`write` in any order and batch size; sequences of other ranks, already
    committed ones and repeats (e.g. a sampler's padding) are skipped. :attr:`pending_sequences` lists what is
    left, so a resumed producer can skip finished work. Call :meth:`finalize` once everything is written.

    Refusals, checked at construction: a folder holding shards or parts of another :class:`CacheSpec` raises
    :class:`CacheMismatchError` (``overwrite=True`` deletes them); a complete cache of the same spec makes this
    writer :attr:`complete` (writes are ignored; logged); an interrupted run of the same spec with another
    ``world_size`` raises.

    Args:
        cache_dir: the cache folder (created if missing).
        spec: identity of the content (:meth:`CacheSpec.for_processor`).
        rank: this writer's rank.
        world_size: number of writer ranks (= shards).
        overwrite: delete shards and parts of another spec instead of refusing.
        commit_sequences: sequences buffered in memory before they are committed to a part file (the work a
            kill can lose).
        chunk_entries: HDF5 chunk length of the ``entries`` dataset (elements).
        progress: called with the number of sequences accepted by each :meth:`write` (e.g. ``tqdm.update``).
    """

    def __init__(
        self,
        cache_dir: str | Path,
        spec: CacheSpec,
        *,
        rank: int = 0,
        world_size: int = 1,
        overwrite: bool = False,
        commit_sequences: int = 64,
        chunk_entries: int = 1 << 14,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if commit_sequences < 1:
            raise ValueError(f"commit_sequences must be >= 1, got commit_sequences={commit_sequences}")
        if chunk_entries < 1:
            raise ValueError(f"chunk_entries must be >= 1, got chunk_entries={chunk_entries}")
        self.cache_dir = Path(cache_dir)
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.commit_sequences = commit_sequences
        self.chunk_entries = chunk_entries
        self.progress = progress
        self.path = self.cache_dir / shard_name(rank, world_size)
        self.parts_dir = self.cache_dir / (self.path.stem + ".parts")
        self._mine = shard_sequences(spec.num_sequences, rank, world_size)  # (S,) sorted
        self._done = np.zeros(len(self._mine), dtype=bool)  # committed, by position in self._mine
        self._buffer: list[EncodedSequences] = []
        self._buffered = 0
        self.complete = False
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._check_folder(overwrite)
        if not self.complete:
            self._open_parts()

    # ----------------------------------------------------------------------------------------- set-up
    def _check_folder(self, overwrite: bool) -> None:
        """Apply the refusals; set :attr:`complete` when a complete cache of this spec is present."""
        finished: dict[int, set[int]] = {}  # world size -> ranks with a complete shard of this spec
        unfinished: set[int] = set()  # world sizes with parts of this spec
        for entry in sorted(self.cache_dir.iterdir()):
            match = SHARD_RE.match(entry.name) or PARTS_RE.match(entry.name)
            if not match:
                continue
            rank, world = map(int, match.groups())
            # concurrent ranks: each deletes only its own entries; rank 0 also those of other world sizes
            mine = (rank, world) == (self.rank, self.world_size) or (self.rank == 0 and world != self.world_size)
            is_parts = entry.suffix == ".parts"
            if is_parts and not (entry / "manifest.json").exists():
                if mine:  # killed before its manifest was committed: holds no committed part
                    _remove(entry)
                continue  # (another rank's may be being created right now)
            try:
                spec = self._spec_of(entry, is_parts)
            except CacheError as err:
                if not overwrite:
                    raise CacheCorruptError(f"{err}; delete it or pass overwrite=True") from err
                if mine:
                    log.warning("overwrite=True: removing unreadable %s (%s)", entry, err)
                    _remove(entry)
                continue
            if spec != self.spec:
                if not overwrite:
                    raise CacheMismatchError(
                        f"{self.cache_dir} holds {entry.name}, written with other parameters "
                        f"({spec.describe_difference(self.spec)}); pass overwrite=True to replace it, "
                        "or write to another folder"
                    )
                if mine:
                    log.warning("overwrite=True: removing %s (other parameters)", entry)
                    _remove(entry)
            elif is_parts:
                unfinished.add(world)
            else:
                finished.setdefault(world, set()).add(rank)
        if self.rank in finished.get(self.world_size, ()) or any(len(r) == w for w, r in finished.items()):
            self.complete = True
            self._done[:] = True  # nothing pending
            if self.parts_dir.exists():  # killed between the final rename and the clean-up
                _remove(self.parts_dir)
            log.info("teacher cache %s is already complete for these parameters; nothing to write", self.cache_dir)
            return
        other = sorted((unfinished | set(finished)) - {self.world_size})
        if other:
            raise CacheIncompleteError(
                f"{self.cache_dir} holds an interrupted cache of the same parameters written with "
                f"world_size={other[0]}; resume with {other[0]} ranks, or pass overwrite=True to start over"
            )

    def _spec_of(self, entry: Path, is_parts: bool) -> CacheSpec:
        if not is_parts:
            return CacheSpec.from_attrs(read_attrs(entry), entry)
        try:
            return CacheSpec(**json.loads((entry / "manifest.json").read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise CacheCorruptError(f"unreadable manifest in {entry}: {err}") from err

    def _open_parts(self) -> None:
        """Create the parts folder, or resume from its committed parts."""
        self.parts_dir.mkdir(exist_ok=True)
        manifest = self.parts_dir / "manifest.json"
        if not manifest.exists():
            tmp = manifest.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self.spec), sort_keys=True))
            os.replace(tmp, manifest)
            _fsync_dir(self.parts_dir)
        for tmp in self.parts_dir.glob("*.tmp"):  # a part or manifest interrupted mid-write
            tmp.unlink()
        self.path.with_suffix(".h5.tmp").unlink(missing_ok=True)  # an interrupted merge
        self._parts = sorted(self.parts_dir.glob("part-*.npz"))
        for part in self._parts:
            with np.load(part) as data:
                self._mark_done(data["sequence_index"])
        if self._parts:
            log.info(
                "resuming %s: %d of %d sequences already written", self.path.name, self._done.sum(), len(self._done)
            )

    def _mark_done(self, sequence_index: np.ndarray) -> None:
        self._done[np.searchsorted(self._mine, sequence_index)] = True

    # ----------------------------------------------------------------------------------------- writing
    @property
    def pending_sequences(self) -> np.ndarray:
        """Global indices of this rank's sequences not yet committed (sorted int64)."""
        return self._mine[~self._done]

    def write(self, sequence_index: Tensor | np.ndarray, tokens: Tensor, target: SparseTarget) -> int:
        """Add whole sequences; returns how many were accepted (others are skipped, see the class doc).

        Args:
            sequence_index: ``(B,)`` global sequence indices.
            tokens: ``(B, seq_len + 1)`` token rows (inputs and labels).
            target: the processor's output for the ``B * seq_len`` positions, sequence-major.
        """
        if self.complete or not len(self._mine):
            return 0
        index = torch.as_tensor(sequence_index).detach().cpu().to(torch.int64)  # (B,)
        if index.dim() != 1:
            raise ValueError(f"sequence_index must be 1-D, got shape {tuple(index.shape)}")
        idx = index.numpy()
        pos = np.searchsorted(self._mine, idx).clip(max=len(self._mine) - 1)  # (B,)
        keep = (self._mine[pos] == idx) & ~self._done[pos]  # this rank's, not committed yet
        buffered = np.concatenate([b.sequence_index for b in self._buffer] or [np.empty(0, np.int64)])
        keep &= ~np.isin(idx, buffered)  # not buffered yet
        _, first = np.unique(idx, return_index=True)
        keep &= np.isin(np.arange(len(idx)), first)  # repeats within the batch
        if not keep.any():
            return 0
        if not keep.all():
            rows = torch.from_numpy(np.flatnonzero(keep))  # (B',)
            length = self.spec.seq_len
            positions = (rows[:, None] * length + torch.arange(length)[None, :]).reshape(-1)  # (B' * L,)
            target = target.select(positions.to(target.ids.device))
            tokens, index = tokens[rows.to(tokens.device)], index[rows]
        encoded = encode(index, tokens, target, self.spec)
        self._buffer.append(encoded)
        self._buffered += len(encoded.sequence_index)
        if self._buffered >= self.commit_sequences:
            self.commit()
        if self.progress is not None:
            self.progress(len(encoded.sequence_index))
        return len(encoded.sequence_index)

    def commit(self) -> None:
        """Persist the buffered sequences as a part file (atomic); a no-op when nothing is buffered."""
        if not self._buffer:
            return
        arrays = {name: np.concatenate([getattr(b, name) for b in self._buffer]) for name in self._buffer[0].as_dict()}
        number = int(self._parts[-1].stem.split("-")[1]) + 1 if self._parts else 0
        part = self.parts_dir / f"part-{number:06d}.npz"
        tmp = part.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, part)
        _fsync_dir(self.parts_dir)
        self._parts.append(part)
        self._mark_done(arrays["sequence_index"])
        self._buffer, self._buffered = [], 0

    def close(self) -> None:
        """Commit what is buffered (a later run resumes from it); does not finalise."""
        if not self.complete:
            self.commit()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- finalising
    def finalize(self) -> Path:
        """Merge the parts into the final shard (complete, checksummed) and return its path.

        Raises:
            CacheIncompleteError: some of this rank's sequences were never written.
        """
        if self.complete:
            return self.path
        self.commit()
        if not self._done.all():
            missing = self.pending_sequences
            raise CacheIncompleteError(
                f"cannot finalise {self.path.name}: {len(missing)} of {len(self._mine)} sequences were never "
                f"written (first missing: {missing[:5].tolist()})"
            )
        tmp = self.path.with_suffix(".h5.tmp")
        _merge_parts(self._parts, tmp, self.spec, self.rank, self.world_size, self.chunk_entries)
        os.replace(tmp, self.path)
        _fsync_dir(self.cache_dir)
        shutil.rmtree(self.parts_dir)
        self.complete = True
        return self.path


def _merge_parts(parts: list[Path], out: Path, spec: CacheSpec, rank: int, world_size: int, chunk_entries: int) -> None:
    """Write the final shard from committed parts, sequences sorted by global index."""
    length = spec.seq_len
    index, where, starts, sizes = [], [], [], []
    max_count = 0
    for number, part in enumerate(parts):  # first pass: only per-sequence figures stay in memory
        with np.load(part) as data:
            seq, counts = data["sequence_index"], data["counts"]
        index.append(seq)
        where.append(np.stack([np.full(len(seq), number), np.arange(len(seq))], axis=1))
        # where each sequence's entries start in this part: (S_p + 1,)
        sizes.append(counts.reshape(-1, length).sum(1, dtype=np.int64))  # (S_p,) entries per sequence
        starts.append(np.concatenate([[0], np.cumsum(sizes[-1])]))
        max_count = max(max_count, int(counts.max()) if counts.size else 0)
    index_all = np.concatenate(index) if index else np.empty(0, np.int64)
    where_all = np.concatenate(where) if where else np.empty((0, 2), np.int64)
    order = np.argsort(index_all, kind="stable")
    index_all, where_all = index_all[order], where_all[order]  # (S,), (S, 2): part number, row in part
    num_seq = len(index_all)
    seq_entries = np.concatenate(sizes)[order] if sizes else np.empty(0, np.int64)  # (S,)
    offsets = np.concatenate([[0], np.cumsum(seq_entries)]).astype(np.int64)  # (S + 1,)
    num_entries = int(offsets[-1])
    cdtype = count_dtype(max(max_count, 1))

    # chunk sizes near the targets, evened out so that the last chunk is (almost) full: no padded tail
    tok_rows = _fit(num_seq, max(1, 4096 // (length + 1)))
    tok_chunk = length * _fit(num_seq, max(1, 2048 // length))
    chunk_entries = _fit(num_entries, chunk_entries)
    with h5py.File(out, "w") as f:

        def create(name: str, shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...]) -> h5py.Dataset:
            return f.create_dataset(
                name, shape=shape, dtype=dtype, chunks=chunks, maxshape=(None,) * len(shape), fletcher32=True
            )

        create("sequence_index", (num_seq,), np.int64, (_fit(num_seq, 4096),))[:] = index_all
        create("sequence_offsets", (num_seq + 1,), np.int64, (_fit(num_seq + 1, 4096),))[:] = offsets
        d_tokens = create("tokens", (num_seq, length + 1), np.int32, (tok_rows, length + 1))
        d_counts = create("counts", (num_seq * length,), cdtype, (tok_chunk,))
        d_std = create("std", (num_seq * length,), np.float16, (tok_chunk,))
        d_entropy = create("entropy", (num_seq * length,), np.float16, (tok_chunk,))
        d_entries = create("entries", (num_entries,), entry_dtype(spec.vocab_size), (chunk_entries,))

        # copy runs of consecutive rows of the same part in one go
        loaded: tuple[int, dict[str, np.ndarray]] | None = None
        s = 0
        while s < num_seq:
            p, r = where_all[s]
            e = s + 1
            while e < num_seq and where_all[e, 0] == p and where_all[e, 1] == where_all[e - 1, 1] + 1:
                e += 1
            if loaded is None or loaded[0] != p:
                with np.load(parts[p]) as data:
                    loaded = (p, {k: data[k] for k in data.files})
            arrays, n = loaded[1], e - s
            d_tokens[s:e] = arrays["tokens"][r : r + n]
            d_counts[s * length : e * length] = arrays["counts"][r * length : (r + n) * length].astype(cdtype)
            d_std[s * length : e * length] = arrays["std"][r * length : (r + n) * length]
            d_entropy[s * length : e * length] = arrays["entropy"][r * length : (r + n) * length]
            d_entries[offsets[s] : offsets[e]] = arrays["entries"][starts[p][r] : starts[p][r + n]]
            s = e

        f.attrs.update(spec.to_attrs())
        f.attrs.update(
            rank=rank,
            world_size=world_size,
            num_shard_sequences=num_seq,
            num_tokens=num_seq * length,
            num_entries=num_entries,
            max_count=max_count,
        )
        f.flush()
        f.attrs["complete"] = True  # last: everything above is flushed before the mark
    with open(out, "rb+") as fh:
        os.fsync(fh.fileno())


def _fit(total: int, target: int) -> int:
    """The chunk length closest to ``target`` that splits ``total`` into equal chunks (up to rounding)."""
    chunks = max(1, -(-total // target))
    return max(1, -(-total // chunks))


class BackgroundWriter:
    """Runs :meth:`CacheWriter.write` in a thread behind a bounded queue, so the teacher never waits on disk.

    :meth:`write` blocks only when ``max_pending`` batches are already queued. An error in the thread is raised
    by the next :meth:`write`, :meth:`close` or :meth:`finalize`. Do not modify tensors after passing them.

    Args:
        writer: the shard writer to drive.
        max_pending: queued batches before :meth:`write` blocks.
    """

    def __init__(self, writer: CacheWriter, max_pending: int = 4) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got max_pending={max_pending}")
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="teacher-cache-writer", daemon=True)
        self._thread.start()

    @property
    def complete(self) -> bool:
        return self.writer.complete

    @property
    def pending_sequences(self) -> np.ndarray:
        return self.writer.pending_sequences

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self.writer.write(*item)
                except BaseException as err:  # noqa: BLE001 - handed to the producer
                    self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"background cache writer for {self.writer.path} failed: {self._error}") from self._error

    def write(self, sequence_index: Tensor | np.ndarray, tokens: Tensor, target: SparseTarget) -> None:
        """Queue whole sequences (arguments as :meth:`CacheWriter.write`)."""
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("background cache writer is closed")
        while True:
            try:
                self._queue.put((sequence_index, tokens, target), timeout=0.5)
                return
            except queue.Full:
                self._raise()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise()

    def close(self) -> None:
        """Drain the queue, stop the thread and commit what is buffered (raises a thread error)."""
        self._stop()
        self.writer.close()

    def finalize(self) -> Path:
        """Drain the queue, stop the thread and finalise the shard."""
        self._stop()
        return self.writer.finalize()
