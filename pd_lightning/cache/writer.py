"""Writing a teacher cache once, in bounded self-contained shards: resumable, crash-safe, optionally in a thread.

Writer rank ``r`` of ``W`` writes the shards ``j = r, r + W, ...`` (see :mod:`pd_lightning.cache.format`), one
at a time, streaming whole sequences into ``shard-{j:06d}.h5.tmp`` as they arrive. When the shard's last sequence
is in, the writer stores the per-sequence tables and the attributes, sets ``complete=True`` last, fsyncs, renames
the file into place (atomic), fsyncs the folder, and records the shard in the rank's index
``index-{r:05d}-of-{W:05d}.json`` (written to a temporary file, fsynced, renamed). The last writer to finish writes
``index.json`` for the whole cache. Every byte of the cache is written once: there are no part files, no merge and
no second copy, so the disk holds at most the finished shards plus one partly written shard per rank.

Commit granularity is the shard: a kill (or an exception) loses at most the shard being written; its ``.tmp``
is deleted by the next run, which writes that shard again from its first sequence. A kill between the rename
and the index update leaves a complete shard that no index names: the next run adopts it (its attributes say it
is complete and of this spec). Since every shard holds a fixed range of global sequences, the final content does
not depend on the interruption history, nor on the number of writer ranks.

One run at a time: :class:`WriterLock` (``flock`` on ``.pd-lightning-predict.lock`` in the folder, held by every
rank of the run that writes it, gone with its processes) refuses a second ``pd-lightning predict`` on the same folder
before it writes anything. Below it, a writer renames only the ``.tmp`` file it created itself (same inode), so even
two writers that bypass the lock cannot put a half-written shard in place under a complete index.

A write error (a full disk) never leaves HDF5 with a file it cannot close: the failed ``.tmp`` is closed with its
last writes sent to ``/dev/null`` and deleted (HDF5 crashes the interpreter at exit over a file whose close failed),
and HDF5's errors carry their ``errno`` and path as an ``OSError``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from pd_lightning.cache.format import (
    INDEX_NAME,
    RANK_INDEX_RE,
    SCHEMA1_RE,
    SCHEMA_VERSION,
    SHARD_RE,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheSpec,
    EncodedSequences,
    blocks_per_sequence,
    check_schema,
    count_dtype,
    encode,
    encode_sequence_blocks,
    entry_dtype,
    fsync_dir,
    index_document,
    rank_index_name,
    read_attrs,
    read_layout,
    schema1_message,
    shard_id_table,
    shard_name,
    shard_schema,
    table_sequences,
    write_json_atomic,
)
from pd_lightning.distill.target import SparseTarget

log = logging.getLogger(__name__)

OVERWRITE_HINT = "pass --writer.overwrite true to replace it, or write to another --writer.output"
LOCK_NAME = ".pd-lightning-predict.lock"
# Test hook: "<point>:<n>" SIGKILLs this process at <point> of the n-th shard it finishes (1-based): mid_shard
# (the .tmp partly written), before_rename (the .tmp complete), after_rename (before the index update), after_index.
_KILL_ENV = "PD_LIGHTNING_TEST_KILL_AT"


def _fit(total: int, target: int) -> int:
    """The chunk length closest to ``target`` that splits ``total`` into equal chunks (up to rounding)."""
    chunks = max(1, -(-total // target))
    return max(1, -(-total // chunks))


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _cat(pieces: list[EncodedSequences]) -> EncodedSequences:
    return EncodedSequences(**{k: np.concatenate([getattr(p, k) for p in pieces]) for k in pieces[0].as_dict()})


@contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """HDF5's I/O errors (h5py raises them as ``RuntimeError``/``OSError`` whose text holds ``errno = N``) and OS
    errors without a file name, as ``OSError(errno, strerror, path)``: ``cli`` then names the file in one line."""
    try:
        yield
    except (RuntimeError, OSError) as err:
        code = err.errno if isinstance(err, OSError) else None
        if code is None:
            found = re.search(r"errno = (\d+)", str(err))
            code = int(found[1]) if found else None
        if code is None or (isinstance(err, OSError) and err.filename is not None):
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


def _write_index(path: Path, document: dict[str, Any]) -> None:
    """``write_json_atomic``, naming ``path`` in its OS errors and leaving no temporary file behind when it fails."""
    try:
        with _os_errors(path):
            write_json_atomic(path, document)
    except BaseException:
        path.with_name(f".{path.name}.{os.getpid()}.tmp").unlink(missing_ok=True)  # write_json_atomic's
        raise


def _discard_h5(file: h5py.File) -> None:
    """Close an HDF5 file that is being thrown away, whatever state its writes left it in.

    After a failed write (``ENOSPC``), HDF5's close tries to flush again, fails, and the half-closed file then
    crashes the interpreter when it is garbage-collected at exit (a segfault). Its descriptor is pointed at
    ``/dev/null`` first, so the close succeeds: nothing of the file is kept anyway.
    """
    if not file:  # closed already
        return
    try:
        fd = file.id.get_vfd_handle()
    except Exception:  # noqa: BLE001 - a driver without a descriptor: close as it is
        fd = None
    if isinstance(fd, int) and fd >= 0:
        null = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(null, fd)
        finally:
            os.close(null)
    try:
        file.close()
    except Exception as err:  # noqa: BLE001 - the file is deleted next; nothing to report
        log.debug("closing a discarded shard file: %s", err)


class CacheLockedError(CacheError):
    """Another process is writing the same cache folder."""


class WriterLock:
    """The lock of a cache folder that one ``pd-lightning predict`` run (all its ranks) holds while it writes there.

    ``flock`` on ``<folder>/.pd-lightning-predict.lock``: the kernel drops it with the process that holds it (a
    SIGKILL, a crash), so a stale lock never blocks a rerun. Rank 0 takes it exclusively (refused if any process holds
    it, in any mode), writes its pid and host into the file and turns it into a shared lock; the other ranks of the
    run, told by rank 0 that it succeeded, then take it shared too. A second run's rank 0 finds it held (by the ranks
    of the first run, even by ones that outlive their rank 0) and is refused before anything is written. The last
    holder to release it deletes the file. Works wherever ``flock`` does (local file systems; NFS emulates it with
    byte-range locks).

    Args:
        cache_dir: the cache folder (created if missing).
    """

    def __init__(self, cache_dir: str | Path) -> None:
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open_locked(self, mode: int) -> int | None:
        """A descriptor of the lock file locked with ``mode`` (non-blocking); ``None`` if another holder blocks it."""
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise FileExistsError(f"--writer.output {self.cache_dir} is a file, not a folder; name a folder")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:  # the file we locked must still be the one of that name (its last holder deletes it on release)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def acquire(self) -> bool:
        """Rank 0 (or a single process): take the lock for a run; ``False`` if another process holds it."""
        if self._fd is not None:
            return True
        fd = self._open_locked(fcntl.LOCK_EX)
        if fd is None:
            return False
        try:  # who holds it, for the refusal of a second run (best effort: a full disk must not stop the run here)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # let the run's other ranks join (atomic on Linux)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def join(self) -> bool:
        """Another rank of the run whose rank 0 holds the lock: hold it too (shared)."""
        if self._fd is None:
            self._fd = self._open_locked(fcntl.LOCK_SH)
        return self._fd is not None

    def holder(self) -> str:
        """``pid N on host H`` of the run holding the lock, as its rank 0 wrote it (empty if unknown)."""
        try:
            return self.path.read_text().strip()
        except OSError:
            return ""

    def refusal(self) -> CacheLockedError:
        holder = self.holder()
        return CacheLockedError(
            f"--writer.output {self.cache_dir} is being written by another pd-lightning predict"
            f"{f' ({holder})' if holder else ''}; only one run may write a cache folder at a time: wait for that run "
            "to end (or stop it), then rerun to resume, or choose another --writer.output"
        )

    def release(self) -> None:
        """Drop the lock; the last holder deletes the file. Idempotent, never raises."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only when no other rank (or run) holds it any more
            try:
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.path.unlink()
            except FileNotFoundError:
                pass
        except OSError:
            pass
        finally:
            os.close(fd)


class _OpenShard:
    """The shard being written: a ``.tmp`` HDF5 file whose per-position datasets have their final size."""

    def __init__(
        self, path: Path, spec: CacheSpec, shard: int, chunk_entries: int, schema: int = SCHEMA_VERSION
    ) -> None:
        self.path, self.spec, self.shard, self.schema = path, spec, shard, check_schema(schema)
        self.start, self.stop = spec.shard_range(shard)
        n, length, g = self.stop - self.start, spec.seq_len, len(spec.power_gammas)
        self.tmp = path.with_name(path.name + ".tmp")
        try:
            with _os_errors(self.tmp):
                self.file = h5py.File(self.tmp, "w", track_order=False)
                stat = os.stat(self.tmp)
        except BaseException:
            self.tmp.unlink(missing_ok=True)  # created (or truncated) by this very call: ours
            raise
        self.inode = (stat.st_dev, stat.st_ino)  # the file this writer created (see ``ours``)
        try:
            with _os_errors(self.tmp):
                self._create_datasets(spec, n, length, g, chunk_entries)
        except BaseException:
            self.abandon()
            raise
        self.written = 0  # sequences written
        self.sizes: list[np.ndarray] = []  # entries per sequence
        self.num_entries = 0
        self.max_count = 0
        # schema 3: the id table (built from the shard's first table_sequences(L) sequences), the sequences waiting
        # for it, and the byte length of every coded block written
        self.table = None
        self.pending: list[EncodedSequences] = []
        self.block_sizes: list[int] = []
        self.entry_bytes = 0

    def _create_datasets(self, spec: CacheSpec, n: int, length: int, g: int, chunk_entries: int) -> None:
        pos_chunk = length * _fit(n, max(1, 2048 // length))

        def create(name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...], **kw) -> h5py.Dataset:
            if 0 in shape:  # HDF5 cannot chunk an empty dimension; nothing to checksum either
                return self.file.create_dataset(name, shape=shape, dtype=dtype, track_times=False)
            return self.file.create_dataset(
                name, shape=shape, dtype=dtype, chunks=chunks, fletcher32=True, track_times=False, **kw
            )

        self.tokens = create("tokens", (n, length + 1), np.int32, (_fit(n, max(1, 4096 // (length + 1))), length + 1))
        cdtype = count_dtype(spec.max_entries or spec.vocab_size)
        self.counts = create("counts", (n * length,), cdtype, (pos_chunk,))
        self.stats = {
            name: create(name, (n * length,), np.float16, (pos_chunk,)) for name in ("std", "entropy", "tail")
        }
        self.power = create("power_sum", (n * length, g), np.float16, (pos_chunk, max(g, 1)))
        if self.schema == 2:
            self.entries = self.file.create_dataset(
                "entries", shape=(0,), maxshape=(None,), dtype=entry_dtype(spec.vocab_size), chunks=(chunk_entries,),
                fletcher32=True, track_times=False,
            )  # fmt: skip
        else:  # the coded blocks, back to back (chunks of the byte size of schema 2's entry chunks)
            self.entries = self.file.create_dataset(
                "blocks", shape=(0,), maxshape=(None,), dtype=np.uint8, chunks=(4 * chunk_entries,), fletcher32=True,
                track_times=False,
            )  # fmt: skip

    def ours(self) -> bool:
        """Whether ``.tmp`` is still the file this writer created: another writer of the same folder (one that did not
        take the lock) may have deleted it as stale and started its own under the same name."""
        try:
            stat = os.stat(self.tmp)
        except FileNotFoundError:
            return False
        return (stat.st_dev, stat.st_ino) == self.inode

    def append(self, block: EncodedSequences) -> None:
        """Write the next consecutive sequences."""
        with _os_errors(self.tmp):
            self._append(block)

    def _append(self, block: EncodedSequences) -> None:
        length = self.spec.seq_len
        a, b = self.written, self.written + len(block.sequence_index)
        self.tokens[a:b] = block.tokens
        self.counts[a * length : b * length] = block.counts
        for name, dset in self.stats.items():
            dset[a * length : b * length] = getattr(block, name)
        if self.power.shape[1]:
            self.power[a * length : b * length] = block.power_sum
        e = len(block.entries)
        if self.schema == 2:
            if e:
                self.entries.resize((self.num_entries + e,))
                self.entries[self.num_entries :] = block.entries
        else:
            self.pending.append(block)
            if self.table is not None or b >= min(table_sequences(length), self.stop - self.start):
                self._code_pending()
        self.num_entries += e
        self.sizes.append(block.sequence_entries(length))
        self.max_count = max(self.max_count, int(block.counts.max()) if block.counts.size else 0)
        self.written = b

    def _code_pending(self) -> None:
        """Schema 3: code the sequences waiting in :attr:`pending` (building the id table first if needed)."""
        if not self.pending:
            return
        length = self.spec.seq_len
        counts = np.concatenate([p.counts for p in self.pending])
        entries = np.concatenate([p.entries for p in self.pending])
        if self.table is None:
            first = int(counts[: table_sequences(length) * length].sum(dtype=np.int64))
            self.table = shard_id_table(entries[:first], self.spec.vocab_size)
        first = self.start + len(self.block_sizes) // blocks_per_sequence(length)  # the first pending sequence
        blocks = encode_sequence_blocks(counts, entries, length, self.table, self.spec.nlogp_max, first)
        data = np.frombuffer(b"".join(blocks), dtype=np.uint8)
        if data.size:
            self.entries.resize((self.entry_bytes + data.size,))
            self.entries[self.entry_bytes :] = data
        self.entry_bytes += data.size
        self.block_sizes.extend(len(x) for x in blocks)
        self.pending = []

    def finish(self) -> dict[str, Any]:
        """Tables, attributes, ``complete`` last; close and fsync the ``.tmp``. Returns the shard's index record."""
        with _os_errors(self.tmp):
            return self._finish()

    def _finish(self) -> dict[str, Any]:
        n = self.stop - self.start
        if self.schema == 3:
            self._code_pending()  # a shard of fewer sequences than the table's sample
        sizes = np.concatenate(self.sizes) if self.sizes else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)  # (n + 1,)
        f = self.file
        # Both datasets are held until the file is closed: a dataset object dropped at once is closed by h5py's
        # destructor, where a failed write of its chunks (a full disk) is only printed, never raised.
        self.tables = [
            f.create_dataset(
                "sequence_index", data=np.arange(self.start, self.stop, dtype=np.int64),
                chunks=(_fit(max(n, 1), 4096),), fletcher32=True, track_times=False,
            ),
            f.create_dataset(
                "sequence_offsets", data=offsets, chunks=(_fit(n + 1, 4096),), fletcher32=True, track_times=False
            ),
        ]  # fmt: skip
        if self.schema == 3:
            nb = n * blocks_per_sequence(self.spec.seq_len)
            if len(self.block_sizes) != nb:
                raise RuntimeError(f"{self.tmp}: {len(self.block_sizes)} entry blocks coded, expected {nb}")
            block_offsets = np.concatenate([[0], np.cumsum(self.block_sizes, dtype=np.int64)]).astype(np.int64)
            table = np.frombuffer(self.table.to_bytes(), dtype=np.uint8)
            self.tables += [
                f.create_dataset("block_offsets", data=block_offsets, chunks=(_fit(nb + 1, 4096),), fletcher32=True,
                                 track_times=False),
                f.create_dataset("id_table", data=table, chunks=(_fit(table.size, 1 << 16),), fletcher32=True,
                                 track_times=False),
            ]  # fmt: skip
        f.attrs.update(self.spec.to_attrs(self.schema))
        record = {
            "shard": self.shard,
            "first_sequence": self.start,
            "num_shard_sequences": n,
            "num_tokens": n * self.spec.seq_len,
            "num_entries": self.num_entries,
            "max_count": self.max_count,
        }
        if self.schema == 3:
            record["entry_bytes"] = self.entry_bytes
        f.attrs.update(record)
        f.flush()
        f.attrs["complete"] = True  # last: everything above is flushed before the mark
        f.close()
        with open(self.tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        record["bytes"] = self.tmp.stat().st_size
        return record

    def abandon(self) -> None:
        """Close and delete the ``.tmp`` (never another writer's file of the same name); never raises an I/O error."""
        try:
            _discard_h5(self.file)
        finally:
            if self.ours():
                self.tmp.unlink(missing_ok=True)


class CacheWriter:
    """Writes writer rank ``rank``'s shards (``rank, rank + world_size, ...``) of a cache into ``cache_dir``.

    Feed whole sequences with :meth:`write` in any batch size, ideally in :attr:`pending_sequences` order (out of
    order sequences are held in memory until their turn); sequences of other ranks' shards, of finished shards, and
    repeats (e.g. a sampler's padding) are skipped. Call :meth:`finalize` once everything is written.

    Refusals, checked at construction: a folder holding another cache (other :class:`CacheSpec`, a schema-1 cache,
    an unreadable index) raises :class:`CacheMismatchError` / :class:`CacheCorruptError` naming
    ``--writer.overwrite true``, which makes rank 0 delete that cache's files first. A complete cache of the same
    spec makes this writer :attr:`complete` (writes are ignored); if its final ``index.json`` is missing (a kill
    after the last shard), it is written here, so a rerun always finishes the cache.

    Args:
        cache_dir: the cache folder (created if missing).
        spec: identity of the content (:meth:`CacheSpec.for_processor`), including the shard size.
        rank: this writer's rank.
        world_size: number of writer ranks (any number; it may change between runs).
        overwrite: replace another cache found in ``cache_dir`` instead of refusing.
        chunk_entries: HDF5 chunk length of the ``entries`` dataset (elements).
        write_sequences: sequences gathered in memory before they are written into the open shard.
        progress: called with the number of sequences accepted by each :meth:`write` (e.g. ``tqdm.update``).
        schema: the shard format: 3 (the default: coded entry blocks, ~2.2 B per entry) or 2 (4 B per packed entry).
            A folder holding the other schema's cache of the same spec is refused like another cache.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        spec: CacheSpec,
        *,
        rank: int = 0,
        world_size: int = 1,
        overwrite: bool = False,
        chunk_entries: int = 1 << 14,
        write_sequences: int = 64,
        progress: Callable[[int], object] | None = None,
        schema: int = SCHEMA_VERSION,
    ) -> None:
        self.schema = check_schema(schema)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if chunk_entries < 1 or write_sequences < 1:
            raise ValueError(f"chunk_entries and write_sequences must be >= 1, got {chunk_entries}, {write_sequences}")
        self.cache_dir = Path(cache_dir)
        if self.cache_dir.exists() and not self.cache_dir.is_dir():
            raise FileExistsError(f"--writer.output {self.cache_dir} is a file, not a folder; name a folder")
        self.spec = spec
        self.rank, self.world_size = rank, world_size
        self.chunk_entries, self.write_sequences = chunk_entries, write_sequences
        self.progress = progress
        self.index_path = self.cache_dir / rank_index_name(rank, world_size)
        self._mine = spec.rank_shards(rank, world_size)  # (J,)
        self._records: dict[int, dict[str, Any]] = {}  # this rank's index
        self._done: set[int] = set()  # finished shards (all ranks)
        self._held: dict[int, EncodedSequences] = {}  # sequences that arrived before their turn
        self._buffer: list[EncodedSequences] = []
        self._open: _OpenShard | None = None
        self._finished_here = 0
        kill = os.environ.get(_KILL_ENV, "")
        self._kill = (kill.split(":")[0], int(kill.split(":")[1])) if ":" in kill else None
        self.complete = False
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._scan(overwrite)
        self._queue = [int(j) for j in self._mine if j not in self._done]  # my unfinished shards, in order
        self._next = self.spec.shard_range(self._queue[0])[0] if self._queue else None
        if not self._queue:
            self._finish_cache()

    # ----------------------------------------------------------------------------------------- set-up
    def _scan(self, overwrite: bool) -> None:
        """Apply the refusals, adopt finished shards that no index names, remove stale temporary files."""
        d, names = self.cache_dir, sorted(p.name for p in self.cache_dir.iterdir())
        old = [n for n in names if SCHEMA1_RE.match(n)]
        if old:
            if not overwrite:
                raise CacheMismatchError(f"{schema1_message(d)}; {OVERWRITE_HINT}")
            if self.rank == 0:
                log.warning("--writer.overwrite true: removing the schema-1 cache in %s", d)
                for n in old:
                    _remove(d / n)
        try:
            layout = read_layout(d, check_files=False)
        except CacheError as err:
            if not overwrite:
                raise type(err)(f"{err}; {OVERWRITE_HINT}") from err
            layout = None
            if self.rank == 0:
                self._remove_other_cache(names)
        if layout is not None and (layout.spec != self.spec or layout.schema != self.schema):
            if not overwrite:
                if layout.spec == self.spec:
                    raise CacheMismatchError(
                        f"--writer.output {d} holds a schema-{layout.schema} cache of this teacher and data "
                        f"({len(layout.shards)} of {self.spec.num_shards} shards finished); this run writes schema "
                        f"{self.schema}: finish it with --writer.schema {layout.schema}, convert a finished one with "
                        f"`pd-lightning cache-upgrade`, or {OVERWRITE_HINT}"
                    )
                raise CacheMismatchError(
                    f"--writer.output {d} holds a teacher cache written with other parameters "
                    f"({layout.spec.describe_difference(self.spec)}); {OVERWRITE_HINT}"
                )
            layout = None
            if self.rank == 0:
                log.warning("--writer.overwrite true: removing the other cache in %s", d)
                self._remove_other_cache(names)
        listed = {} if layout is None else layout.shards
        for n in names:
            if n.startswith(".index") and n.endswith(".tmp"):  # an index write interrupted before its rename
                stale = n.startswith(f".{self.index_path.name}.") or (
                    self.rank == 0 and not n.startswith(f".index-{0:05d}-of-") and f"-of-{self.world_size:05d}" not in n
                )  # mine, or (rank 0) index.json's and other world sizes' (no rank of this run writes those now)
                if stale:
                    _remove(d / n)
                continue
            if n.endswith(".tmp"):
                match = SHARD_RE.match(n[: -len(".tmp")])
                j = int(match[1]) if match else -1
                if match and (j % self.world_size == self.rank or j >= self.spec.num_shards):
                    _remove(d / n)  # a shard interrupted mid-write: written again from its first sequence
                continue
            match = SHARD_RE.match(n)
            if not match or not (d / n).exists():
                continue
            j = int(match[1])
            if j in listed:
                self._done.add(j)
                if j in self._mine:
                    self._records[j] = listed[j]
                continue
            record = self._adoptable(d / n, j, overwrite)  # complete but unrecorded: a kill before the index update
            if record is not None:
                self._done.add(j)
                if j in self._mine:
                    self._records[j] = record
        for j in set(listed) - self._done:
            log.warning("%s: the index names %s, which is missing; it is written again", d, shard_name(j))
        if self._records:
            _write_index(self.index_path, index_document(self.spec, self._records, self.schema, rank=self.rank,
                                                         world_size=self.world_size))  # fmt: skip
        done = len(self._done)
        if done == self.spec.num_shards:
            self.complete = True
        elif done:
            log.info("resuming %s: %d of %d shards already finished", d, done, self.spec.num_shards)

    def _adoptable(self, path: Path, shard: int, overwrite: bool) -> dict[str, Any] | None:
        """The index record of a complete shard of this spec that no index names, or ``None``."""
        try:
            attrs = read_attrs(path)
            spec = CacheSpec.from_attrs(attrs, path)
        except CacheError as err:
            if shard % self.world_size == self.rank:
                log.warning("removing unreadable unindexed %s (%s); it is written again", path, err)
                _remove(path)
            return None
        if spec != self.spec or shard_schema(attrs) != self.schema:
            if not overwrite:
                what = spec.describe_difference(self.spec) or f"schema {shard_schema(attrs)} != {self.schema}"
                raise CacheMismatchError(
                    f"--writer.output {self.cache_dir} mixes two caches: {path.name} was written with other parameters "
                    f"({what}); {OVERWRITE_HINT}"
                )
            if self.rank == 0:
                _remove(path)
            return None
        if not attrs.get("complete", False) or int(attrs.get("shard", -1)) != shard:
            return None
        keys = ("shard", "first_sequence", "num_shard_sequences", "num_tokens", "num_entries", "max_count")
        keys += ("entry_bytes",) if "entry_bytes" in attrs else ()
        return {**{k: int(attrs[k]) for k in keys}, "bytes": path.stat().st_size}

    def _remove_other_cache(self, names: list[str]) -> None:
        """Rank 0 under ``--writer.overwrite true``: delete the other cache's indexes and shards (checked first)."""
        for n in names:
            path = self.cache_dir / n
            if n == INDEX_NAME or RANK_INDEX_RE.match(n):
                try:
                    doc = json.loads(path.read_text())
                    keep = CacheSpec.from_json(doc["spec"], path) == self.spec
                    keep = keep and int(doc["schema_version"]) == self.schema
                except (OSError, ValueError, KeyError, TypeError, CacheError):
                    keep = False
                if not keep:
                    _remove(path)
            elif SHARD_RE.match(n):
                try:
                    attrs = read_attrs(path)
                    keep = CacheSpec.from_attrs(attrs, path) == self.spec and shard_schema(attrs) == self.schema
                except CacheError:
                    keep = False
                if not keep:
                    _remove(path)

    # ----------------------------------------------------------------------------------------- writing
    @property
    def path(self) -> Path:
        """The cache folder."""
        return self.cache_dir

    @property
    def pending_sequences(self) -> np.ndarray:
        """Global indices of the sequences of this rank's unfinished shards (sorted int64; a shard in progress
        counts in full, since it is written again from its start if the run stops before it is finished)."""
        ranges = [np.arange(*self.spec.shard_range(j), dtype=np.int64) for j in self._queue]
        return np.concatenate(ranges) if ranges else np.zeros(0, np.int64)

    def _wanted(self, idx: np.ndarray) -> np.ndarray:
        """``(B,)`` bool: sequences of my unfinished shards that were not written or held yet (first occurrence)."""
        if not self._queue:
            return np.zeros(len(idx), dtype=bool)
        shard = idx // self.spec.sequences_per_shard
        keep = np.isin(shard, self._queue) & (idx >= 0) & (idx < self.spec.num_sequences)
        keep &= ~((shard == self._queue[0]) & (idx < self._next))
        keep &= ~np.isin(idx, list(self._held))
        _, first = np.unique(idx, return_index=True)
        keep &= np.isin(np.arange(len(idx)), first)
        return keep

    def write(self, sequence_index: Tensor | np.ndarray, tokens: Tensor, target: SparseTarget) -> int:
        """Add whole sequences; returns how many were accepted (others are skipped, see the class doc).

        Args:
            sequence_index: ``(B,)`` global sequence indices.
            tokens: ``(B, seq_len + 1)`` token rows (inputs and labels).
            target: the processor's output for the ``B * seq_len`` positions, sequence-major.
        """
        index = torch.as_tensor(sequence_index).detach().cpu().to(torch.int64)  # (B,)
        if index.dim() != 1:
            raise ValueError(f"sequence_index must be 1-D, got shape {tuple(index.shape)}")
        keep = self._wanted(index.numpy())
        if not keep.any():
            return 0
        if not keep.all():
            rows = torch.from_numpy(np.flatnonzero(keep))  # (B',)
            length = self.spec.seq_len
            positions = (rows[:, None] * length + torch.arange(length)[None, :]).reshape(-1)  # (B' * L,)
            target = target.select(positions.to(target.ids.device))
            tokens, index = tokens[rows.to(tokens.device)], index[rows]
        return self.write_encoded(encode(index, tokens, target, self.spec))

    def write_encoded(self, encoded: EncodedSequences) -> int:
        """:meth:`write` for sequences already in the storage representation (``cache-upgrade`` copies a schema-2
        shard's datasets this way: the new shards hold what a fresh ``predict`` would write). Returns how many
        sequences were accepted."""
        keep = self._wanted(encoded.sequence_index)
        if not keep.any():
            return 0
        length = self.spec.seq_len
        bounds = np.concatenate([[0], np.cumsum(encoded.sequence_entries(length))])
        accepted = 0
        for r, seq in enumerate(encoded.sequence_index.tolist()):  # one piece per sequence, kept until its turn
            if not keep[r]:
                continue
            pos = slice(r * length, (r + 1) * length)
            self._held[seq] = EncodedSequences(
                sequence_index=encoded.sequence_index[r : r + 1],
                tokens=encoded.tokens[r : r + 1],
                counts=encoded.counts[pos],
                entries=encoded.entries[bounds[r] : bounds[r + 1]],
                std=encoded.std[pos],
                entropy=encoded.entropy[pos],
                tail=encoded.tail[pos],
                power_sum=encoded.power_sum[pos],
            )
            accepted += 1
        self._drain()
        if self.progress is not None:
            self.progress(accepted)
        return accepted

    def _drain(self) -> None:
        """Move held sequences that are next in line into the open shard; finish shards that are full."""
        while self._queue and self._next in self._held:
            self._buffer.append(self._held.pop(self._next))
            self._next += 1
            stop = self.spec.shard_range(self._queue[0])[1]
            if len(self._buffer) >= self.write_sequences or self._next == stop:
                self._flush()
            if self._next == stop:
                self._finish_shard()

    def _flush(self) -> None:
        if not self._buffer:
            return
        if self._open is None:
            j = self._queue[0]
            self._open = _OpenShard(self.cache_dir / shard_name(j), self.spec, j, self.chunk_entries, self.schema)
        self._open.append(_cat(self._buffer))
        self._buffer = []
        self._maybe_kill("mid_shard", self._finished_here + 1)

    def _finish_shard(self) -> None:
        shard = self._open
        if shard is None:  # an empty shard cannot happen (shards hold >= 1 sequence); guard anyway
            shard = _OpenShard(self.cache_dir / shard_name(self._queue[0]), self.spec, self._queue[0], 1, self.schema)
        record = shard.finish()
        self._finished_here += 1
        self._maybe_kill("before_rename", self._finished_here)
        if not shard.ours():  # renaming by name would put the other writer's half-written file in place
            raise CacheLockedError(
                f"{shard.tmp} was deleted or replaced by another process writing {self.cache_dir} at the same time; "
                "only one pd-lightning predict may write a cache folder: rerun it alone"
            )
        os.replace(shard.tmp, shard.path)
        fsync_dir(self.cache_dir)
        self._maybe_kill("after_rename", self._finished_here)
        self._records[shard.shard] = record
        _write_index(self.index_path, index_document(self.spec, self._records, self.schema, rank=self.rank,
                                                     world_size=self.world_size))  # fmt: skip
        self._maybe_kill("after_index", self._finished_here)
        self._done.add(shard.shard)
        self._open = None
        self._queue.pop(0)
        self._next = self.spec.shard_range(self._queue[0])[0] if self._queue else None

    def _maybe_kill(self, point: str, count: int) -> None:
        if self._kill is not None and self._kill == (point, count):
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        """Stop without finishing: the partly written shard is deleted (a rerun writes it again from its start)."""
        if self._open is not None:
            self._open.abandon()
            self._open = None
        self._buffer, self._held = [], {}

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------------------------------- finalising
    def finalize(self) -> Path:
        """Check that this rank's shards are all written; write ``index.json`` when the whole cache is.

        Returns:
            ``index.json`` when the cache is complete, else this rank's index (other ranks are still writing).

        Raises:
            CacheIncompleteError: some of this rank's sequences were never written.
        """
        if self._queue:
            missing = self.pending_sequences
            self.close()
            raise CacheIncompleteError(
                f"cannot finish {self.cache_dir}: {len(missing)} sequences of this rank's shards were never written "
                f"(first missing: {missing[:5].tolist()}); rerun `pd-lightning predict` with the same arguments"
            )
        return self._finish_cache()

    def _finish_cache(self) -> Path:
        """Write ``index.json`` if every shard of the cache is finished (by any rank); idempotent."""
        layout = read_layout(self.cache_dir, check_files=False)
        if layout is None or not layout.complete:
            return self.index_path
        final = self.cache_dir / INDEX_NAME
        if not layout.final:
            _write_index(final, index_document(self.spec, layout.shards, self.schema, complete=True))
        for n in os.listdir(self.cache_dir):
            if RANK_INDEX_RE.match(n):  # everything they list is in index.json now
                (self.cache_dir / n).unlink(missing_ok=True)
        self.complete = True
        return final


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

    @property
    def error(self) -> BaseException | None:
        """The writer thread's error, as it was raised there (``None`` while all is well)."""
        return self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    try:
                        self.writer.write(*item)
                    except BaseException as err:  # noqa: BLE001 - handed to the producer
                        self._error = err
                        self.writer.close()  # the partly written shard goes now: its disk space too
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, CacheError | ValueError | OSError):
                raise type(err)(f"background cache writer for {self.writer.path} failed: {err}") from err
            raise RuntimeError(f"background cache writer for {self.writer.path} failed: {err}") from err

    def write(
        self, sequence_index: Tensor | np.ndarray, tokens: Tensor, target: SparseTarget, raise_error: bool = True
    ) -> None:
        """Queue whole sequences (arguments as :meth:`CacheWriter.write`).

        Args:
            raise_error: raise the thread's error here; ``False``: drop the sequences once it has one and leave the
                error to :attr:`error` (a distributed caller that must stop all ranks at the same batch).
        """
        if not raise_error and self._error is not None:
            return
        self._raise()
        if not self._thread.is_alive():
            raise RuntimeError("background cache writer is closed")
        while True:
            try:
                self._queue.put((sequence_index, tokens, target), timeout=0.5)
                return
            except queue.Full:
                if not raise_error and self._error is not None:
                    return
                self._raise()

    def wait(self) -> None:
        """Block until everything queued so far is written (or dropped after an error); raises nothing."""
        if self._thread.is_alive():
            self._queue.join()

    def _stop(self, raise_error: bool = True) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_error:
            self._raise()

    def close(self, raise_error: bool = True) -> None:
        """Drain the queue, stop the thread and drop the partly written shard (raises a thread error unless
        ``raise_error`` is false)."""
        try:
            self._stop(raise_error)
        finally:
            self.writer.close()

    def finalize(self) -> Path:
        """Drain the queue, stop the thread and finish (see :meth:`CacheWriter.finalize`)."""
        self._stop()
        return self.writer.finalize()
