"""Token shards: packing a split's token stream into bounded HDF5 shard files, the index that lists them, reading.

Packing (``SplitPacker``): the split's stream (documents' ids + EOS, in unit order) is cut into rows
``row i = stream[i*L : i*L + L + 1]`` (rows overlap by one token, so no token is lost between two rows); at most
``shard_rows`` rows go in one shard file ``<split>-<k>.<tag>.h5`` (dataset ``rows``, (n, L+1) int32, fletcher32
chunks; attrs ``rows`` and ``sha256`` of the rows' bytes), written under a temporary name and renamed when full.
After each finished shard the packer's *committed position* is the stream offset of its carried tokens, so a
killed run restarts the split from there with exactly the same rows.

Index (``write_index``): the token file the user names (e.g. ``tokens.h5``) holds the attributes of the whole
output, ``layout = "shards"``, ``shards`` (JSON: per split, file, rows, sha256) and, for any HDF5 reader, virtual
datasets ``train`` / ``val`` that map onto the shards. It is written to a temporary name and renamed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

SPLITS = ("train", "val")


class GuardedFile:
    """The file h5py's ``fileobj`` driver writes an HDF5 file through: write errors are kept in ``error``, never
    passed on to HDF5.

    HDF5 cannot survive a failed write (a full disk): the write error surfaces at the file's close, and the next
    close or the interpreter's exit then segfaults (HDF5 2.0 / h5py 3.16), so a full disk killed ``prepare`` with
    signal 11. Here HDF5 always succeeds; after the first error the writes are dropped (the file is being
    discarded), and the owner checks ``error`` after each step (:func:`check_written`) and raises it. Unbuffered,
    so a seek or a close never flushes (and fails); a short write is completed.
    """

    def __init__(self, path: Path) -> None:
        self.raw = open(path, "w+b", buffering=0)
        self.error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        while self.error is None and len(view):
            try:
                view = view[self.raw.write(view) :]
            except OSError as e:
                self.error = e
        return size

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self.raw.truncate(size)
            except OSError as e:
                self.error = e
        return size or 0

    def flush(self) -> None:  # unbuffered: nothing to flush
        pass

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def read(self, size: int = -1) -> bytes:  # h5py recognises a file object by read + seek
        return self.raw.read(size)

    def close(self) -> None:
        self.raw.close()


def h5_create(path: Path) -> tuple[h5py.File, GuardedFile]:
    """A new HDF5 file written through a :class:`GuardedFile`, and that file. Close with :func:`h5_close`."""
    guard = GuardedFile(path)
    try:
        file = h5py.File(guard, "w")
    except BaseException:
        guard.close()
        raise
    if guard.error is not None:
        h5_close(file, guard, path)  # raises the error
    return file, guard


def check_written(guard: GuardedFile, path: Path) -> None:
    """Raise the first write error of ``guard`` as an ``OSError`` naming ``path``."""
    if guard.error is not None:
        raise write_error(guard.error, path) from None


def h5_close(file: h5py.File | None, guard: GuardedFile, path: Path) -> None:
    """Close a file of :func:`h5_create` (whatever happened, both get closed); a write error names ``path``."""
    error = None
    try:
        if file is not None:
            file.close()
    except (OSError, RuntimeError) as e:
        error = e
    guard.close()
    if guard.error is not None or error is not None:
        raise write_error(guard.error or error, path) from None


def write_error(e: BaseException, path: Path) -> OSError:
    """``e`` (an ``OSError``, or the ``RuntimeError`` h5py raises for a failed flush) as ``OSError`` naming ``path``."""
    code = getattr(e, "errno", None)
    if code is None and "No space left" in str(e):
        code = errno.ENOSPC
    if code is None:
        return e if isinstance(e, OSError) else OSError(errno.EIO, str(e).splitlines()[0], str(path))
    return OSError(code, os.strerror(code), str(path))


class ShardWriter:
    """One shard file being filled: appends rows, hashes them, renames itself into place when finished.

    A write that fails (a full disk) raises ``OSError`` naming the shard; the caller then calls ``abandon``, which
    removes the unfinished file, so only finished shards stay (a rerun resumes after them).
    """

    def __init__(self, path: Path, seq_len: int, capacity: int) -> None:
        self.path, self.rows = path, 0
        self.tmp = path.with_name(path.name + ".tmp")
        self.file, self.guard = h5_create(self.tmp)
        try:
            chunk = (max(1, min(64, capacity)), seq_len + 1)
            self.dset = self.file.create_dataset(
                "rows", shape=(0, seq_len + 1), maxshape=(None, seq_len + 1), dtype="<i4", chunks=chunk,
                fletcher32=True,
            )  # fmt: skip
            check_written(self.guard, self.path)
        except BaseException:
            self.abandon()
            raise
        self.sha = hashlib.sha256()

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype="<i4")
        try:
            self.dset.resize(self.rows + len(rows), axis=0)
            self.dset[self.rows :] = rows
        except (OSError, RuntimeError) as e:
            raise write_error(self.guard.error or e, self.path) from None
        check_written(self.guard, self.path)
        self.sha.update(rows.tobytes())
        self.rows += len(rows)

    def finish(self) -> dict:
        entry = {"file": self.path.name, "rows": self.rows, "sha256": self.sha.hexdigest()}
        self.file.attrs.update(rows=self.rows, sha256=entry["sha256"])
        file, self.file = self.file, None
        h5_close(file, self.guard, self.path)  # a full disk raises here: the caller abandons (removes) the file
        os.replace(self.tmp, self.path)
        return entry

    def abandon(self) -> None:
        """Close (errors ignored: the file is being discarded) and remove the unfinished file."""
        file, self.file = self.file, None
        if not self.guard.raw.closed:
            try:
                h5_close(file, self.guard, self.path)
            except OSError:
                pass
        self.tmp.unlink(missing_ok=True)


class SplitPacker:
    """Packs one split's token stream into shards; ``committed`` = {"g": stream offset of the carry, "shards": [...]}
    is what a resumed run starts from (rows of an unfinished shard are redone)."""

    def __init__(self, split: str, seq_len: int, shard_rows: int, shards_dir: Path, tag: str, committed: dict) -> None:
        self.split, self.L, self.shard_rows, self.dir, self.tag = split, seq_len, shard_rows, shards_dir, tag
        self.committed = {"g": int(committed["g"]), "shards": list(committed["shards"])}
        self.g = self.committed["g"]  # stream offset of self.buf[0]
        self.buf = np.zeros(0, dtype=np.int32)
        self.writer: ShardWriter | None = None
        self.changed = False  # a shard finished since the caller last saved the state

    def _writer(self) -> ShardWriter:
        if self.writer is None:
            k = len(self.committed["shards"])
            self.writer = ShardWriter(self.dir / f"{self.split}-{k:05d}.{self.tag}.h5", self.L, self.shard_rows)
        return self.writer

    def _finish_shard(self, g_after: int) -> None:
        self.committed = {"g": g_after, "shards": [*self.committed["shards"], self.writer.finish()]}
        self.writer, self.changed = None, True

    def feed(self, tokens: np.ndarray) -> None:
        buf = np.concatenate([self.buf, tokens]) if len(self.buf) else tokens
        n = (len(buf) - 1) // self.L if len(buf) else 0
        if n > 0:
            rows = np.lib.stride_tricks.sliding_window_view(buf, self.L + 1)[:: self.L][:n]  # (n, L+1) view
            i = 0
            while i < n:
                w = self._writer()
                take = min(n - i, self.shard_rows - w.rows)
                w.append(rows[i : i + take])
                i += take
                if w.rows == self.shard_rows:
                    self._finish_shard(self.g + i * self.L)
        self.buf = buf[n * self.L :].copy()
        self.g += n * self.L

    def close(self) -> dict:
        """Finish the last (partial) shard; the carry (< L + 1 tokens) is dropped."""
        if self.writer is not None and self.writer.rows:
            self._finish_shard(self.g)
        elif self.writer is not None:
            self.writer.abandon()
            self.writer = None
        return self.committed

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.abandon()
            self.writer = None


def write_index(out: Path, attrs: dict, shards: dict[str, list[dict]], shards_dir: Path, seq_len: int) -> None:
    """Write the index ``out`` atomically: ``attrs``, the shard list, and virtual datasets over the shards."""
    rel = os.path.relpath(shards_dir.resolve(), out.parent.resolve())
    listed = {s: [{**e, "file": f"{rel}/{e['file']}"} for e in shards[s]] for s in SPLITS}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    f = guard = None
    try:
        f, guard = h5_create(tmp)
        for split in SPLITS:
            n = sum(e["rows"] for e in listed[split])
            if n == 0:
                f.create_dataset(split, shape=(0, seq_len + 1), dtype="<i4")
                continue
            layout = h5py.VirtualLayout(shape=(n, seq_len + 1), dtype="<i4")
            at = 0
            for e in listed[split]:
                layout[at : at + e["rows"]] = h5py.VirtualSource(e["file"], "rows", shape=(e["rows"], seq_len + 1))
                at += e["rows"]
            f.create_virtual_dataset(split, layout)
        f.attrs.update(attrs)
        f.attrs.update(layout="shards", shards=json.dumps(listed))
        file, f = f, None
        h5_close(file, guard, out)
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        raise write_error((guard and guard.error) or e, out) from None
    finally:
        if guard is not None and not guard.raw.closed:  # failed before the close: close quietly, then remove
            try:
                h5_close(f, guard, out)
            except OSError:
                pass
        tmp.unlink(missing_ok=True)


class ShardedRows:
    """Rows of the splits of a sharded token file: ``rows(split, index)`` over the shard files, opened lazily.

    Opening checks that every listed shard exists and carries the row count and sha256 the index lists (a shard
    of another ``prepare`` run, or a missing one, is refused: an HDF5 virtual dataset would read zeros instead).
    """

    def __init__(self, index: Path, shards_json: str, seq_len: int, flag: str) -> None:
        listed = json.loads(shards_json)
        self.width = seq_len + 1
        self.files: dict[str, list[Path]] = {}
        self.offsets: dict[str, np.ndarray] = {}
        self.entries = listed
        for split in SPLITS:
            paths = []
            for e in listed.get(split, []):
                p = index.parent / e["file"]
                if not p.is_file():
                    raise FileNotFoundError(
                        f"{flag}: shard {str(p)!r} of token file {str(index)!r} is missing "
                        "(run `pd-lightning prepare` again)"
                    )
                try:
                    with h5py.File(p, "r") as f:
                        rows, sha = int(f.attrs["rows"]), str(f.attrs["sha256"])
                except (OSError, KeyError) as e2:
                    raise ValueError(f"{flag}: shard {str(p)!r} is not a readable token shard ({e2})") from None
                if rows != e["rows"] or sha != e["sha256"]:
                    raise ValueError(
                        f"{flag}: shard {str(p)!r} does not belong to token file {str(index)!r} (written by another "
                        "`pd-lightning prepare`); run prepare again"
                    )
                paths.append(p)
            self.files[split] = paths
            self.offsets[split] = np.cumsum([0] + [e["rows"] for e in listed.get(split, [])])
        self._open: dict[Path, h5py.Dataset] = {}

    def length(self, split: str) -> int:
        return int(self.offsets[split][-1])

    def _dset(self, path: Path) -> h5py.Dataset:
        d = self._open.get(path)
        if d is None:
            d = self._open[path] = h5py.File(path, "r")["rows"]
        return d

    def rows(self, split: str, index) -> np.ndarray:
        off, n = self.offsets[split], self.length(split)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"row {index} out of range for split {split!r} with {n} rows")
            k = int(np.searchsorted(off, i, side="right")) - 1
            return self._dset(self.files[split][k])[i - off[k]]
        idx = np.arange(n)[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"rows out of range for split {split!r} with {n} rows")
        out = np.empty((len(idx), self.width), dtype=np.int32)
        shard = np.searchsorted(off, idx, side="right") - 1
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            local = idx[sel] - off[k]
            uniq, inverse = np.unique(local, return_inverse=True)
            d = self._dset(self.files[split][k])
            if len(uniq) == uniq[-1] - uniq[0] + 1:  # contiguous: one slice read
                block = d[int(uniq[0]) : int(uniq[-1]) + 1]
            else:
                block = d[uniq]
            out[sel] = block[inverse]
        return out

    def verify(self) -> None:
        """Recompute every shard's sha256 and compare it with the index (reads all data)."""
        for split in SPLITS:
            for p, e in zip(self.files[split], self.entries.get(split, [])):
                sha = hashlib.sha256()
                d = self._dset(p)
                for start in range(0, d.shape[0], 4096):
                    sha.update(np.ascontiguousarray(d[start : start + 4096], dtype="<i4").tobytes())
                if sha.hexdigest() != e["sha256"]:
                    raise ValueError(f"token shard {str(p)!r} fails its checksum (run `pd-lightning prepare` again)")

    def close(self) -> None:
        for d in self._open.values():
            d.file.close()
        self._open.clear()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}
