"""`pd-lightning predict` under real faults: a second writer on the same folder, a full disk (a small tmpfs), more
ranks than shards, SIGTERM and Ctrl-C (SIGINT) on 1 and 2 ranks. Every run is a real subprocess (``OMP_NUM_THREADS=1``;
2 ranks: Lightning's DDP launcher on CPU, gloo), held at an exact batch by ``tests.predict_gate.Gate``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pd_lightning.cache.format import content_checksum, read_layout
from pd_lightning.cli import main
from tests.test_predict import predict_args, shard_files, val_shards

ROOT = Path(__file__).resolve().parents[1]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
TIMEOUT = 300  # seconds per run: a rank left waiting in a collective fails the test instead of hanging it


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def gate(path: Path, batch: int) -> list[str]:
    """Hold rank 0 after predict batch ``batch`` until ``path`` exists (``path.reached`` says it got there)."""
    return ["--trainer.callbacks+=tests.predict_gate.Gate", f"--trainer.callbacks.path={path}",
            f"--trainer.callbacks.batch={batch}"]  # fmt: skip


class Run:
    """A ``pd-lightning`` subprocess in its own session (all its ranks in one process group), output in files."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.out, self.err = log.with_suffix(".out"), log.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pd_lightning.cli", *args], env=env(), cwd=ROOT,
                                         stdout=out, stderr=err, start_new_session=True)  # fmt: skip

    def wait_for(self, path: Path, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert self.proc.poll() is None, f"the run ended ({self.proc.returncode}) first:\n{self.stderr[-3000:]}"
            assert time.monotonic() < deadline, f"{path} never appeared"
            time.sleep(0.05)

    def finish(self, timeout: float = TIMEOUT) -> int:
        """The exit code, once the process and every rank it started (its process group) are gone."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"the run hung; stderr:\n{self.stderr[-3000:]}")
        deadline = time.monotonic() + 60
        while True:  # its other ranks: they must end too, not be left writing
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return self.proc.returncode
            if time.monotonic() > deadline:
                os.killpg(self.proc.pid, signal.SIGKILL)
                pytest.fail(f"ranks of the run outlived it; stderr:\n{self.stderr[-3000:]}")
            time.sleep(0.05)

    @property
    def stderr(self) -> str:
        return self.err.read_text()

    @property
    def stdout(self) -> str:
        return self.out.read_text()


def run(args: list[str], log: Path) -> tuple[int, str, str]:
    r = Run(args, log)
    code = r.finish()
    return code, r.stdout, r.stderr


def one_error_line(stderr: str, *needles: str) -> str:
    """The run's one ``pd-lightning:`` line on stderr (besides the libraries' progress and start-up lines), and no
    traceback, crash or rank-prefixed error from any rank."""
    lines = stderr.splitlines()
    bad = [
        s for s in lines if re.search(r"Traceback|Fatal Python|Segmentation|KeyboardInterrupt|^\[rank\d+\]|Error:", s)
    ]
    assert not bad, stderr[-3000:]
    ours = [s for s in lines if "pd-lightning:" in s]
    assert len(ours) == 1, "expected one pd-lightning line on stderr, got:\n" + "\n".join(ours)
    for needle in needles:
        assert needle in ours[0], (needle, ours[0])
    return ours[0]


def no_partial_files(folder: Path) -> None:
    left = [p.name for p in folder.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".pd-lightning")]
    assert not left, left


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, hf_teacher, prepared) -> Path:
    """One process, 32 sequences per shard (13 shards of the validation split)."""
    out = tmp_path_factory.mktemp("ref") / "cache"
    main(predict_args(hf_teacher, prepared["tokens"], out))
    return out


@pytest.fixture(scope="module")
def reference_one_shard(tmp_path_factory, hf_teacher, prepared) -> Path:
    """One process, the default shard size: the whole validation split is one shard."""
    out = tmp_path_factory.mktemp("ref1") / "cache"
    main(predict_args(hf_teacher, prepared["tokens"], out, "--writer.shard_tokens", str(1 << 23)))
    assert len(shard_files(out)) == 1
    return out


# ---- item 1: two writers on one folder ------------------------------------------------------------------------------
# Kept short for `make test`: the 1-rank twin of a 2-rank case runs with `make test-slow`.
@pytest.mark.parametrize("ranks", [pytest.param(1, marks=pytest.mark.slow), 2], ids=["1-rank", "2-rank"])
def test_a_second_predict_on_the_same_folder_is_refused(tmp_path, hf_teacher, prepared, reference_cache, ranks):
    """A user re-launching a job that is still running (or two array jobs on one folder): the second run is
    refused in one line, exit 2, before it writes anything, and the first finishes the cache as if alone. With 2
    ranks each, the ranks of one run do not refuse each other, and the second run's rank 1 writes nothing either."""
    out, go = tmp_path / "cache", tmp_path / "go"
    ddp = DDP if ranks == 2 else []
    first = Run(predict_args(hf_teacher, prepared["tokens"], out, *ddp, *gate(go, 10)), tmp_path / "first")
    first.wait_for(go.with_name("go.reached"))
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, err = run(predict_args(hf_teacher, prepared["tokens"], out, *ddp), tmp_path / "second")
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in before}
    go.touch()
    assert first.finish() == 0, first.stderr[-3000:]
    assert code == 2, err[-3000:]
    one_error_line(err, "--writer.output", str(out), "another pd-lightning predict", f"pid {first.proc.pid}")
    assert after == before, "the refused run changed the folder"
    assert content_checksum(out) == content_checksum(reference_cache)
    assert (out / "index.json").exists() and read_layout(out).complete
    no_partial_files(out)  # the lock file went with the run that held it


def test_a_writer_never_renames_a_shard_file_it_did_not_write(tmp_path):
    """Defence in depth below the lock: a second writer of the same shard (here in one process, the first writer's
    .tmp removed as stale by the second one's start, then written again by it) must not make the first writer
    rename the second one's half-written file into place and index it as complete."""
    from pd_lightning.cache.format import CacheError
    from pd_lightning.cache.writer import CacheWriter
    from pd_lightning.distill.processors import TopPK
    from tests.test_cache import make_spec, sequence_data

    proc, spec = TopPK(0.9, 8), make_spec(TopPK(0.9, 8), 300, 16, 8)
    data = {i: sequence_data(i, 300, 16) for i in range(8)}
    a = CacheWriter(tmp_path, spec, write_sequences=1)
    for i in range(4):
        a.write(torch.tensor([i]), data[i][0], proc(data[i][1]))
    b = CacheWriter(tmp_path, spec, write_sequences=1)  # removes a's .tmp: a stale file to it
    for i in range(2):
        b.write(torch.tensor([i]), data[i][0], proc(data[i][1]))
    with pytest.raises(CacheError, match="another"):
        for i in range(4, 8):
            a.write(torch.tensor([i]), data[i][0], proc(data[i][1]))
    assert not shard_files(tmp_path) and read_layout(tmp_path) is None
    a.close()
    b.close()


# ---- item 2: a full disk ------------------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                           text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"a full disk needs a small tmpfs, and mount is not permitted here: {mount.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize(
    "shard_tokens,ranks",
    [(2048, 1), pytest.param(1 << 23, 1, marks=pytest.mark.slow), (2048, 2)],
    ids=["small-shards", "default-shards", "2-rank-small-shards"],
)
def test_a_full_disk_ends_in_one_line_and_a_rerun_finishes_the_same_cache(
    tmp_path, tmpfs, hf_teacher, prepared, reference_cache, reference_one_shard, shard_tokens, ranks
):
    """A 1 MiB tmpfs fills up during the cache (~3.3 MB): one line naming the path, exit 2 (was: a segfault, rc 139,
    from HDF5 closing the failed .tmp at exit, after several tracebacks), the finished shards kept and the partial
    one removed; after space is freed, a rerun gives the identical cache. With 2 ranks, the rank whose write fails
    stops both at the same batch and rank 0 says why."""
    out = tmpfs / "cache"
    ddp = DDP if ranks == 2 else []
    args = predict_args(hf_teacher, prepared["tokens"], out, "--writer.shard_tokens", str(shard_tokens), *ddp)
    code, _, err = run(args, tmp_path / "full")
    assert code == 2, err[-3000:]
    one_error_line(err, str(out), "no space left on device")
    no_partial_files(out)
    kept = shard_files(out)
    if shard_tokens == 2048:
        assert kept, "the shards finished before the disk filled up are kept"
        layout = read_layout(out)
        assert layout is not None and sorted(layout.shards) == [int(p.name[6:12]) for p in kept]
    subprocess.run(["mount", "-o", "remount,size=64m", str(tmpfs)], check=True)
    code, stdout, err = run(args, tmp_path / "rerun")
    assert code == 0, err[-3000:]
    assert ("resuming" in stdout) == bool(kept)
    reference = reference_cache if shard_tokens == 2048 else reference_one_shard
    assert content_checksum(out) == content_checksum(reference)


# ---- item 6: more ranks than shards -------------------------------------------------------------------------------
def test_two_ranks_on_a_cache_of_one_shard(tmp_path, hf_teacher, prepared, reference_one_shard):
    """Rank 1 has no shard to write: it idles (was: 'DataLoader within local rank has zero length') and the cache
    equals one process's."""
    out = tmp_path / "cache"
    args = predict_args(hf_teacher, prepared["tokens"], out, *DDP, "--writer.shard_tokens", str(1 << 23))
    code, _, err = run(args, tmp_path / "run")
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "zero length" not in err, err[-3000:]  # rank 1 crashed, rank 0 finished
    assert content_checksum(out) == content_checksum(reference_one_shard)


# ---- item 8: SIGTERM and Ctrl-C -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ranks,signum",
    [
        (1, signal.SIGTERM),
        pytest.param(1, signal.SIGINT, marks=pytest.mark.slow),
        pytest.param(2, signal.SIGTERM, marks=pytest.mark.slow),
        (2, signal.SIGINT),
    ],  # fmt: skip
    ids=["1-rank-SIGTERM", "1-rank-SIGINT", "2-rank-SIGTERM", "2-rank-SIGINT"],
)
def test_a_signal_stops_every_rank_and_a_rerun_resumes(tmp_path, hf_teacher, prepared, reference_cache, ranks, signum):
    """SIGTERM (``kill PID``: rank 0 only) or Ctrl-C (SIGINT to the whole process group): every rank stops at the same
    batch (they agree through an all-reduce, so no rank is left in a collective), finished shards are kept, the exit
    code is 143 / 130 with one line, and a rerun resumes to the identical cache."""
    out, go = tmp_path / "cache", tmp_path / "go"
    ddp = DDP if ranks == 2 else []
    n, shards = val_shards(prepared)
    job = Run(predict_args(hf_teacher, prepared["tokens"], out, *ddp, *gate(go, 20)), tmp_path / "job")
    job.wait_for(go.with_name("go.reached"))
    if signum == signal.SIGINT:
        os.killpg(job.proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    else:
        os.kill(job.proc.pid, signal.SIGTERM)  # `kill PID`
    time.sleep(0.5)
    go.touch()
    code = job.finish()
    expected = 143 if signum == signal.SIGTERM else 130
    assert code == expected, job.stderr[-3000:]
    name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"
    one_error_line(job.stderr, name, str(out), "rerun")
    assert not (out / "index.json").exists()
    no_partial_files(out)
    layout = read_layout(out)
    assert layout is not None and 0 < len(layout.shards) < shards
    if ranks == 2:  # rank 1 stopped too (it would otherwise have finished its shards 1, 3, ..., 11)
        assert {j for j in layout.shards if j % 2} != set(range(1, shards, 2))
    code, stdout, err = run(predict_args(hf_teacher, prepared["tokens"], out, *ddp), tmp_path / "rerun")
    assert code == 0, err[-3000:]
    assert "resuming" in stdout
    assert content_checksum(out) == content_checksum(reference_cache)
