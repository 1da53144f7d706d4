"""`pd-lightning prepare` on a disk that fills up (issue item 2): one line naming the path, exit 2, no segfault; a
rerun after freeing space resumes and gives the identical token file.

A real full disk: a small tmpfs mounted for the test (the suite runs as root; skipped where mounting is not
permitted), filled with a filler file to leave a chosen amount of free space, so ``ENOSPC`` is met while the parts
are being tokenized, or while the shards are being written. Before the fix HDF5 met the error at a shard's close
and the process then segfaulted (rc 139) after its error line.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pd_lightning.corpus.prepare import TokenFile, prepare

CLI = [sys.executable, "-m", "pd_lightning.cli"]
ROOT = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> dict[str, np.ndarray]:
    tf = TokenFile(path)
    return {s: tf.rows(s, slice(None)) for s in ("train", "val")}


def _shards(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        listed = json.loads(f.attrs["shards"])
        attrs = {k: f.attrs[k] for k in ("num_tokens", "num_documents", "tokenizer_fingerprint", "seq_len")}
    return {"attrs": {k: str(v) for k, v in attrs.items()}, "shards": {s: [(e["rows"], e["sha256"]) for e in v]
            for s, v in listed.items()}}  # fmt: skip


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    except FileNotFoundError:
        pytest.skip("no mount command: a real full disk cannot be made here")
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({proc.stderr.decode().strip()[:100]})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, free_kib: int) -> Path:
    st = os.statvfs(mnt)
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - free_kib * 1024))
    return filler


@pytest.mark.parametrize(("free_kib", "workers"), [(1000, 2), (2500, 0), (2500, 2)])
def test_full_disk_one_line_then_the_rerun_gives_the_same_file(tmp_path, tmpfs, prepared, free_kib, workers):
    from pydoc_data.topics import topics

    corpus = tmp_path / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as f:
        for copy in range(2):
            for k in sorted(topics):
                f.write(json.dumps({"text": f"{copy} {k}\n{topics[k]}"}) + "\n")
    settings = ["--tokenizer", str(prepared["tokenizer"]), "--seq_len", "64", "--chunk_mb", "0.25",
                "--shard_tokens", "50000", "--workers", str(workers)]  # fmt: skip
    ref = tmp_path / "ref" / "tokens.h5"
    prepare(input=[str(corpus)], output=str(ref), tokenizer=str(prepared["tokenizer"]), seq_len=64, chunk_mb=0.25,
            shard_tokens=50000, workers=0)  # fmt: skip
    out = tmpfs / "out" / "tokens.h5"
    command = [*CLI, "prepare", "--input", str(corpus), "--output", str(out), *settings]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    filler = _fill(tmpfs, free_kib)
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    lines = [s for s in proc.stderr.splitlines() if s.strip() and not s.startswith("tokenizing")]  # the bar's updates
    assert proc.returncode == 2, f"rc {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and "Fatal Python error" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("pd-lightning: error: prepare stopped: cannot write '" + str(tmpfs / "out")), lines[0]
    assert "no space left on device" in lines[0] and "rerun the same command" in lines[0], lines[0]
    assert not out.exists()
    assert not list((tmpfs / "out").rglob("*.h5.tmp")), "an unfinished shard was left"

    filler.unlink()  # space freed: the same command finishes, from where it stopped
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _shards(out) == _shards(ref)
    got, want = _rows(out), _rows(ref)
    for split in ("train", "val"):
        np.testing.assert_array_equal(got[split], want[split])
    TokenFile(out).verify()


def test_index_write_error_names_the_output(tmp_path, monkeypatch):
    """The index is written through the same guarded file: a failing write there names --output, nothing is left."""
    from pd_lightning.corpus import token_shards

    real = token_shards.GuardedFile.write

    def full(self, data):
        self.error = self.error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(token_shards.GuardedFile, "write", full)
    out = tmp_path / "tokens.h5"
    with pytest.raises(OSError) as info:
        token_shards.write_index(out, {"seq_len": 4}, {"train": [], "val": []}, tmp_path / "tokens.shards", 4)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    assert list(tmp_path.iterdir()) == []
