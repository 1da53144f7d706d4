"""The HDF5 teacher cache: exact round trips, size bounds, shards, corruption, resume after SIGKILL, refusals."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pd_lightning.data.cache import (
    BackgroundWriter,
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheSpec,
    CacheWriter,
    TeacherCache,
    cache_info,
    content_checksum,
    plot_entries_histogram,
    shard_sequences,
    token_source_fingerprint,
    verify,
)
from pd_lightning.distill.processors import LogitsProcessor, Sampled, TopPK
from pd_lightning.distill.target import SparseTarget

REPO = Path(__file__).resolve().parents[1]


def make_spec(processor: LogitsProcessor, vocab: int, seq_len: int, num: int, teacher: str = "teacher-a") -> CacheSpec:
    return CacheSpec.for_processor(
        processor,
        vocab_size=vocab,
        seq_len=seq_len,
        num_sequences=num,
        teacher_fingerprint=teacher,
        tokenizer_fingerprint="tok-1",
        source_fingerprint="train:abc",
    )


def sequence_data(i: int, vocab: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic token row ``(1, L + 1)`` and teacher logits ``(L, V)`` of sequence ``i``."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, vocab, (1, seq_len + 1), generator=g), torch.randn(seq_len, vocab, generator=g) * 3


def write_cache(
    folder: Path, processor: LogitsProcessor, vocab: int = 300, seq_len: int = 16, num: int = 10, world: int = 1, **kw
) -> dict[int, tuple[torch.Tensor, SparseTarget]]:
    """Write a cache with ``world`` ranks (every rank sees every sequence) and return the references."""
    spec = make_spec(processor, vocab, seq_len, num)
    refs = {}
    for i in range(num):
        tokens, logits = sequence_data(i, vocab, seq_len)
        refs[i] = (tokens[0], processor(logits, torch.arange(seq_len) + i * seq_len))
    for rank in range(world):
        writer = CacheWriter(folder, spec, rank=rank, world_size=world, **kw)
        for i in range(num):
            writer.write(torch.tensor([i]), refs[i][0][None], refs[i][1])
        writer.finalize()
    return refs


def assert_matches(item: dict[str, torch.Tensor], tokens: torch.Tensor, target: SparseTarget, tol: float = 1e-3):
    assert torch.equal(item["input_ids"], tokens[:-1]) and torch.equal(item["labels"], tokens[1:])
    valid = target.valid
    for row in range(valid.shape[0]):
        n = int(valid[row].sum())
        ref_ids, ref_lp = target.ids[row][valid[row]], target.logprobs[row][valid[row]]
        assert torch.equal(item["teacher_ids"][row, :n], ref_ids)
        clamped = ref_lp.clamp(min=math.log(1e-6))  # below 1e-6 the format clamps
        assert (item["teacher_logprobs"][row, :n] - clamped).abs().max() <= tol
        assert torch.isneginf(item["teacher_logprobs"][row, n:]).all() and (item["teacher_ids"][row, n:] == 0).all()
    torch.testing.assert_close(item["teacher_std"], target.std, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(item["teacher_entropy"], target.entropy, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------- round trips
def synthetic_target(g: torch.Generator, n: int, k: int, vocab: int) -> SparseTarget:
    """``n`` positions with 1..k entries: ids over the whole vocabulary, -log p in [0, 16] (some below 1e-6)."""
    ids = torch.randint(0, vocab, (n, k), generator=g)
    ids[0, 0], ids[0, 1] = vocab - 1, 0  # the extremes of the id range
    nlogp = torch.rand(n, k, generator=g, dtype=torch.float64) * 16
    nlogp[1, 0] = 0.0  # p = 1 exactly
    counts = torch.randint(1, k + 1, (n,), generator=g)
    valid = torch.arange(k)[None] < counts[:, None]
    return SparseTarget(
        ids=ids.masked_fill(~valid, 0),
        logprobs=(-nlogp).float().masked_fill(~valid, -math.inf),
        std=torch.rand(n, generator=g) * 8,
        entropy=torch.rand(n, generator=g) * 11,
    )


def write_synthetic(folder: Path, vocab: int, seq_len: int, num: int, k: int, **kw) -> dict:
    g = torch.Generator().manual_seed(vocab)
    writer = CacheWriter(folder, make_spec(TopPK(0.95, k), vocab, seq_len, num), **kw)
    refs = {}
    for i in range(num):
        refs[i] = (torch.randint(0, vocab, (seq_len + 1,), generator=g), synthetic_target(g, seq_len, k, vocab))
        writer.write(torch.tensor([i]), refs[i][0][None], refs[i][1])
    writer.finalize()
    return refs


@pytest.mark.parametrize("vocab", [151_552, 2**24 - 1])
def test_round_trip_bounds_large_vocabularies(tmp_path: Path, vocab: int) -> None:
    refs = write_synthetic(tmp_path, vocab, seq_len=32, num=12, k=8, commit_sequences=5, chunk_entries=512)
    cache = TeacherCache(tmp_path)
    assert len(cache) == 12 and cache.max_entries == 8
    for i, (tokens, target) in refs.items():
        assert_matches(cache[i], tokens, target, tol=5e-4)  # quantisation step / 2 = 4.2e-4
    info = cache_info(tmp_path)
    assert info["bytes_per_entry"] <= (4 if vocab <= 2**18 else 8) * (1 + 4 / 512)  # + fletcher32 per chunk
    assert info["bytes_per_entry"] >= (4 if vocab <= 2**18 else 8)


def test_round_trip_top_p_k_from_logits(tmp_path: Path) -> None:
    refs = write_cache(tmp_path, TopPK(0.9, 20), commit_sequences=3)
    cache = TeacherCache(tmp_path)
    for i, (tokens, target) in refs.items():
        assert_matches(cache[i], tokens, target)
    item = cache.read(4, start=5, stop=11)  # a window of positions
    assert torch.equal(item["teacher_ids"], cache[4]["teacher_ids"][5:11])
    assert torch.equal(item["labels"], refs[4][0][6:12])


def test_unlimited_top_p_and_sampled_caches(tmp_path: Path) -> None:
    refs = write_cache(tmp_path / "p", TopPK(0.8, None), vocab=200)
    cache = TeacherCache(tmp_path / "p")
    assert cache.spec.max_entries is None
    assert cache.max_entries == max(int(t.valid.sum(-1).max()) for _, t in refs.values())
    for i, (tokens, target) in refs.items():
        assert_matches(cache[i], tokens, target)
    write_cache(tmp_path / "s", Sampled(n=12), vocab=200)
    item = TeacherCache(tmp_path / "s")[3]
    assert item["teacher_ids"].shape[1] == 12
    torch.testing.assert_close(item["teacher_logprobs"].exp().sum(-1), torch.ones(16), atol=12e-3, rtol=0)


def test_storage_bounds_for_small_vocabularies(tmp_path: Path) -> None:
    write_synthetic(tmp_path, vocab=2**18, seq_len=64, num=40, k=40, chunk_entries=2048)
    info = cache_info(tmp_path)
    with h5py.File(TeacherCache(tmp_path).files[0]) as f:
        entries = f["entries"]
        assert entries.dtype == np.uint32 and f["counts"].dtype == np.uint8
        chunks = -(-entries.shape[0] // entries.chunks[0])
        storage = entries.id.get_storage_size()
    assert storage <= 4 * entries.shape[0] + 8 * chunks  # 4 B/entry + fletcher32 and < 1 entry/chunk of rounding
    assert info["bytes_per_entry"] <= 4.005
    assert info["bookkeeping_bytes_per_token"] <= 2.0
    assert info["stats_bytes_per_token"] <= 4.01  # two float16 per position


# --------------------------------------------------------------------------------------------- shards and readers
def test_multi_shard_any_reader_layout(tmp_path: Path) -> None:
    refs = write_cache(tmp_path, TopPK(0.9, 12), num=11, world=3, commit_sequences=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shard-0000{r}-of-00003.h5" for r in range(3)]
    with h5py.File(tmp_path / "shard-00001-of-00003.h5") as f:
        assert f["sequence_index"][:].tolist() == shard_sequences(11, 1, 3).tolist() == [1, 4, 7, 10]
    for readers in (1, 2, 4):  # reader ranks each take their stride of the indices
        for r in range(readers):
            cache = TeacherCache(tmp_path)
            for i in range(r, 11, readers):
                assert_matches(cache[i], *refs[i])
    assert verify(tmp_path) == {"shards": 3, "sequences": 11, "tokens": 11 * 16, "entries": verify(tmp_path)["entries"]}
    refs = write_cache(tmp_path / "sparse", TopPK(0.9, 12), num=2, world=3)  # more ranks than sequences
    cache = TeacherCache(tmp_path / "sparse")
    for i in range(2):
        assert_matches(cache[i], *refs[i])


def test_shards_of_any_partition_are_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pd_lightning.data import cache_writer

    def blocks(num: int, rank: int, world: int) -> np.ndarray:  # contiguous blocks instead of strides
        return np.array_split(np.arange(num, dtype=np.int64), world)[rank]

    monkeypatch.setattr(cache_writer, "shard_sequences", blocks)
    refs = write_cache(tmp_path, TopPK(0.9, 12), num=7, world=2)
    cache = TeacherCache(tmp_path)
    assert cache._shard_of is not None  # the general index map, not the strided shortcut
    for i in range(7):
        assert_matches(cache[i], *refs[i])


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(tmp_path: Path, context: str) -> None:
    refs = write_cache(tmp_path, TopPK(0.9, 12), num=9, world=2)
    cache = TeacherCache(tmp_path)
    cache[0]  # handles opened in the parent must not leak into the workers
    loader = DataLoader(cache, batch_size=3, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    assert batches[0]["teacher_ids"].shape == (3, 16, 12) and batches[0]["teacher_logprobs"].dtype == torch.float32
    for b, batch in enumerate(batches):
        for j in range(3):
            i = b * 3 + j
            assert_matches({k: v[j] for k, v in batch.items()}, *refs[i])


def test_check_compatible_names_both_sides(tmp_path: Path) -> None:
    write_cache(tmp_path, TopPK(0.9, 8), num=2)
    cache = TeacherCache(tmp_path)
    cache.check_compatible(vocab_size=300, tokenizer_fingerprint="tok-1", seq_len=16)
    cache.check_compatible(vocab_size=384)  # a padded student vocabulary is fine
    with pytest.raises(CacheMismatchError, match=r"vocab_size=200 < teacher cache vocab_size=300"):
        cache.check_compatible(vocab_size=200)
    with pytest.raises(CacheMismatchError, match=r"'tok-2' != cache's 'tok-1'"):
        cache.check_compatible(tokenizer_fingerprint="tok-2")
    with pytest.raises(CacheMismatchError, match=r"seq_len=32 != cache's seq_len=16"):
        cache.check_compatible(seq_len=32)
    assert cache.meta["processor"]["init_args"] == {"p": 0.9, "k": 8}


# --------------------------------------------------------------------------------------------- damage and refusals
def test_truncated_file_is_detected(tmp_path: Path) -> None:
    write_cache(tmp_path, TopPK(0.9, 12), num=6)
    shard = tmp_path / "shard-00000-of-00001.h5"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size * 6 // 10)
    for action in (TeacherCache, verify):
        with pytest.raises(CacheCorruptError, match=r"shard-00000-of-00001\.h5.*truncated"):
            action(tmp_path)


def test_flipped_byte_is_detected(tmp_path: Path) -> None:
    write_cache(tmp_path, TopPK(0.9, 12), num=6, chunk_entries=256)
    shard = tmp_path / "shard-00000-of-00001.h5"
    with h5py.File(shard) as f:
        offset = f["entries"].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as fh:
        fh.seek(offset + 17)
        byte = fh.read(1)
        fh.seek(offset + 17)
        fh.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CacheCorruptError, match=r"shard-00000-of-00001\.h5.*'/entries'"):
        verify(tmp_path)
    with pytest.raises(CacheCorruptError, match=r"shard-00000-of-00001\.h5.*sequence 0"):
        TeacherCache(tmp_path)[0]


def test_ids_beyond_the_student_vocabulary(tmp_path: Path) -> None:
    write_cache(tmp_path, TopPK(1.0, 50), num=3)
    verify(tmp_path, vocab_size=300)
    with pytest.raises(CacheMismatchError, match=r"holds id 29\d, not below vocab_size=250"):
        verify(tmp_path, vocab_size=250)


def test_writer_refuses_ids_outside_the_vocabulary(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path, make_spec(TopPK(0.9, 4), 100, 4, 1))
    target = SparseTarget(torch.full((4, 4), 100), torch.zeros(4, 4), torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"vocab_size=100"):
        writer.write(torch.tensor([0]), torch.zeros(1, 5, dtype=torch.long), target)


def test_incomplete_shards_are_refused(tmp_path: Path) -> None:
    proc = TopPK(0.9, 8)
    spec = make_spec(proc, 300, 16, 6)
    writer = CacheWriter(tmp_path, spec, rank=0, world_size=2, commit_sequences=1)
    for i in (0, 2):
        tokens, logits = sequence_data(i, 300, 16)
        writer.write(torch.tensor([i]), tokens, proc(logits))
    with pytest.raises(CacheIncompleteError, match=r"unfinished.*rerun `pd-lightning predict`"):
        TeacherCache(tmp_path)
    assert cache_info(tmp_path) == {
        "path": str(tmp_path),
        "complete": False,
        "reason": cache_info(tmp_path)["reason"],
        "committed_sequences": 2,
    }
    with pytest.raises(CacheIncompleteError, match=r"1 of 3 sequences were never written"):
        writer.finalize()
    # a final-named shard without the completeness mark (e.g. copied mid-way) is refused too
    full = tmp_path / "full"
    write_cache(full, proc, num=4, world=1)
    with h5py.File(full / "shard-00000-of-00001.h5", "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(CacheIncompleteError, match=r"shard-00000-of-00001\.h5 is incomplete.*resume"):
        TeacherCache(full)
    # a missing shard of a multi-rank cache
    write_cache(tmp_path / "two", proc, num=4, world=2)
    (tmp_path / "two" / "shard-00001-of-00002.h5").unlink()
    with pytest.raises(CacheIncompleteError, match=r"lacks shard-00001-of-00002\.h5"):
        TeacherCache(tmp_path / "two")


def test_other_parameters_are_refused_same_are_complete(tmp_path: Path) -> None:
    write_cache(tmp_path, TopPK(0.9, 8), num=4)
    before = content_checksum(tmp_path)
    with pytest.raises(CacheMismatchError, match=r"other parameters \(max_entries: 8 != 9; processor"):
        CacheWriter(tmp_path, make_spec(TopPK(0.9, 9), 300, 16, 4))
    with pytest.raises(CacheMismatchError, match=r"teacher_fingerprint: 'teacher-a' != 'teacher-b'"):
        CacheWriter(tmp_path, make_spec(TopPK(0.9, 8), 300, 16, 4, teacher="teacher-b"))
    same = CacheWriter(tmp_path, make_spec(TopPK(0.9, 8), 300, 16, 4))
    assert same.complete and len(same.pending_sequences) == 0  # a producer has nothing to compute
    tokens, logits = sequence_data(0, 300, 16)
    assert same.write(torch.tensor([0]), tokens, TopPK(0.9, 8)(logits)) == 0
    assert same.finalize() == tmp_path / "shard-00000-of-00001.h5" and content_checksum(tmp_path) == before
    other = CacheWriter(tmp_path, make_spec(TopPK(0.9, 9), 300, 16, 4), overwrite=True)
    assert not other.complete and not (tmp_path / "shard-00000-of-00001.h5").exists()
    # an interrupted run of other parameters is refused as well
    other.write(torch.tensor([0]), tokens, TopPK(0.9, 9)(logits))
    other.close()
    with pytest.raises(CacheMismatchError, match=r"shard-00000-of-00001\.parts"):
        CacheWriter(tmp_path, make_spec(TopPK(0.9, 8), 300, 16, 4))


def test_writer_skips_foreign_repeated_and_committed_sequences(tmp_path: Path) -> None:
    proc = TopPK(0.9, 8)
    spec = make_spec(proc, 300, 16, 8)
    writer = CacheWriter(tmp_path, spec, rank=1, world_size=2, commit_sequences=2)
    data = [sequence_data(i, 300, 16) for i in range(8)]

    def batch(idx: list[int]) -> tuple:
        return (
            torch.tensor(idx),
            torch.cat([data[i][0] for i in idx]),
            proc(torch.cat([data[i][1] for i in idx])),
        )

    assert writer.write(*batch([0, 1, 3, 3])) == 2  # 0 is rank 0's, the second 3 a repeat
    assert writer.pending_sequences.tolist() == [5, 7]
    assert writer.write(*batch([1, 5])) == 1
    assert writer.write(*batch([7, 6])) == 1
    writer.finalize()
    cache_dir = tmp_path / "ref"
    write_cache(cache_dir, proc, num=8, world=2)
    assert content_checksum(tmp_path / "shard-00001-of-00002.h5") == content_checksum(
        cache_dir / "shard-00001-of-00002.h5"
    )


def test_checksum_independent_of_order_and_layout(tmp_path: Path) -> None:
    proc = TopPK(0.95, 10)
    write_cache(tmp_path / "a", proc, num=9)
    spec = make_spec(proc, 300, 16, 9)
    writer = CacheWriter(tmp_path / "b", spec, commit_sequences=4, chunk_entries=100)
    for i in [5, 2, 8, 0, 1, 7, 3, 6, 4]:
        tokens, logits = sequence_data(i, 300, 16)
        writer.write(torch.tensor([i]), tokens, proc(logits, torch.arange(16) + i * 16))
    writer.finalize()
    assert content_checksum(tmp_path / "a") == content_checksum(tmp_path / "b")
    write_cache(tmp_path / "c", TopPK(0.95, 11), num=9)
    assert content_checksum(tmp_path / "a") != content_checksum(tmp_path / "c")


# --------------------------------------------------------------------------------------------- resume after SIGKILL
WRITER_SCRIPT = """
import sys, time, torch
from pd_lightning.data.cache import CacheSpec, CacheWriter
from pd_lightning.distill.processors import TopPK

folder, sleep = sys.argv[1], float(sys.argv[2])
V, L, N = 400, 32, 24
proc = TopPK(0.9, 16)
spec = CacheSpec.for_processor(proc, vocab_size=V, seq_len=L, num_sequences=N, teacher_fingerprint="t",
                               tokenizer_fingerprint="tok", source_fingerprint="src")
writer = CacheWriter(folder, spec, commit_sequences=3)
written = 0
for start in range(0, N, 2):  # every sequence is offered; the writer skips committed ones
    idx = list(range(start, start + 2))
    gens = [torch.Generator().manual_seed(i) for i in idx]
    tokens = torch.stack([torch.randint(0, V, (L + 1,), generator=g) for g in gens])
    logits = torch.stack([torch.randn(L, V, generator=g) * 3 for g in gens])
    written += writer.write(torch.tensor(idx), tokens, proc(logits))
    time.sleep(sleep)
writer.finalize()
print("written", written, flush=True)
"""


def _run_writer(script: Path, folder: Path, sleep: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(script), str(folder), str(sleep)], stdout=subprocess.PIPE, env=env)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER_SCRIPT))
    reference = _run_writer(script, tmp_path / "reference", 0.0)
    killed = _run_writer(script, tmp_path / "resumed", 0.25)
    parts = tmp_path / "resumed" / "shard-00000-of-00001.parts"
    deadline = time.monotonic() + 60
    while len(list(parts.glob("part-*.npz"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    committed = 0
    for part in parts.glob("part-*.npz"):
        with np.load(part) as data:
            committed += len(data["sequence_index"])
    assert 6 <= committed < 24, "the kill should land mid-run"
    with pytest.raises(CacheIncompleteError):
        TeacherCache(tmp_path / "resumed")
    # debris of a kill during a part write and during the final merge
    (parts / "part-999999.tmp").write_bytes(b"half a part")
    (tmp_path / "resumed" / "shard-00000-of-00001.h5.tmp").write_bytes(b"\x89HDF\r\n half a shard")
    resumed = _run_writer(script, tmp_path / "resumed", 0.0)
    out, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    written = int(out.split()[-1])
    assert written == 24 - committed  # only the uncommitted sequences were computed again
    assert reference.wait(timeout=120) == 0
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["shard-00000-of-00001.h5"]
    assert content_checksum(tmp_path / "resumed") == content_checksum(tmp_path / "reference")
    verify(tmp_path / "resumed")


# --------------------------------------------------------------------------------------------- background, info
def test_background_writer_and_error_propagation(tmp_path: Path) -> None:
    proc = TopPK(0.9, 8)
    refs = {}
    writer = BackgroundWriter(CacheWriter(tmp_path / "ok", make_spec(proc, 300, 16, 6)), max_pending=1)
    for i in range(6):
        tokens, logits = sequence_data(i, 300, 16)
        refs[i] = (tokens[0], proc(logits))
        writer.write(torch.tensor([i]), tokens, refs[i][1])
    writer.finalize()
    cache = TeacherCache(tmp_path / "ok")
    for i in range(6):
        assert_matches(cache[i], *refs[i])
    bad = BackgroundWriter(CacheWriter(tmp_path / "bad", make_spec(proc, 200, 16, 6)))  # ids up to 299 > 200
    with pytest.raises(RuntimeError, match="background cache writer .* failed") as err:
        for i in range(6):
            bad.write(torch.tensor([i]), refs[i][0][None] % 200, refs[i][1])
        bad.finalize()
    assert isinstance(err.value.__cause__, ValueError)


def test_cache_info_and_plot(tmp_path: Path) -> None:
    refs = write_cache(tmp_path / "c", TopPK(0.9, 20), num=8)
    info = cache_info(tmp_path / "c")
    kept = [t.valid.sum(-1) for _, t in refs.values()]
    tokens = 8 * 16
    assert info["tokens"] == tokens and info["complete"] is True
    assert info["entries"] == sum(int(k.sum()) for k in kept)
    assert sum(info["entries_histogram"].values()) == tokens
    expected_hist = np.bincount(torch.cat(kept).numpy())
    assert info["entries_histogram"] == {c: int(n) for c, n in enumerate(expected_hist) if n}
    assert info["mean_entries_per_token"] == pytest.approx(info["entries"] / tokens)
    ref_mass = torch.cat([t.kept_mass for _, t in refs.values()]).double().mean().item()
    assert info["mean_kept_mass"] == pytest.approx(ref_mass, abs=1e-3)
    assert info["bytes"] == sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
    assert info["bytes_per_token"] == pytest.approx(info["bytes"] / tokens)
    assert info["processor"] == {
        "class_path": "pd_lightning.distill.processors.TopPK",
        "init_args": {"p": 0.9, "k": 20},
    }
    png = plot_entries_histogram(info, tmp_path / "hist.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_source_fingerprint(tmp_path: Path) -> None:
    def token_file(name: str, change: int | None = None) -> Path:
        rows = np.arange(50 * 9, dtype=np.int32).reshape(50, 9)
        if change is not None:
            rows[change, 3] += 1
        with h5py.File(tmp_path / name, "w") as f:
            f["train"], f["val"] = rows, rows[:5]
            f.attrs.update(tokenizer_fingerprint="tok-1", vocab_size=1000, seq_len=8, complete=True)
        return tmp_path / name

    a = token_source_fingerprint(token_file("a.h5"), "train")
    assert a == token_source_fingerprint(token_file("b.h5"), "train")  # content, not the file name
    assert a != token_source_fingerprint(token_file("a.h5"), "val")
    assert a != token_source_fingerprint(token_file("c.h5", change=49), "train")  # the last row is sampled
