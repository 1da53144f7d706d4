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

from pd_lightning.cache import (
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
    token_source_fingerprint,
    verify,
)
from pd_lightning.distill.processors import LogitsProcessor, Sampled, TopPK
from pd_lightning.distill.target import SparseTarget

REPO = Path(__file__).resolve().parents[1]


def make_spec(
    processor: LogitsProcessor,
    vocab: int,
    seq_len: int,
    num: int,
    teacher: str = "teacher-a",
    shard_tokens: int = 1 << 20,
) -> CacheSpec:
    return CacheSpec.for_processor(
        processor,
        vocab_size=vocab,
        seq_len=seq_len,
        num_sequences=num,
        teacher_fingerprint=teacher,
        tokenizer_fingerprint="tok-1",
        source_fingerprint="train:abc",
        shard_tokens=shard_tokens,
    )


def sequence_data(i: int, vocab: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic token row ``(1, L + 1)`` and teacher logits ``(L, V)`` of sequence ``i``."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, vocab, (1, seq_len + 1), generator=g), torch.randn(seq_len, vocab, generator=g) * 3


def write_cache(
    folder: Path,
    processor: LogitsProcessor,
    vocab: int = 300,
    seq_len: int = 16,
    num: int = 10,
    world: int = 1,
    shard_tokens: int = 1 << 20,
    **kw,
) -> dict[int, tuple[torch.Tensor, SparseTarget]]:
    """Write a cache with ``world`` ranks (every rank sees every sequence) and return the references."""
    spec = make_spec(processor, vocab, seq_len, num, shard_tokens=shard_tokens)
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
    if target.tail is not None:
        torch.testing.assert_close(item["teacher_tail"], target.tail, rtol=1e-3, atol=1e-7)


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
        tail=torch.rand(n, generator=g) * 0.3,
    )


def write_synthetic(
    folder: Path, vocab: int, seq_len: int, num: int, k: int, shard_tokens: int = 1 << 20, **kw
) -> dict:
    g = torch.Generator().manual_seed(vocab)
    writer = CacheWriter(folder, make_spec(TopPK(0.95, k), vocab, seq_len, num, shard_tokens=shard_tokens), **kw)
    refs = {}
    for i in range(num):
        refs[i] = (torch.randint(0, vocab, (seq_len + 1,), generator=g), synthetic_target(g, seq_len, k, vocab))
        writer.write(torch.tensor([i]), refs[i][0][None], refs[i][1])
    writer.finalize()
    return refs


SCHEMAS = pytest.mark.parametrize("schema", [2, 3])  # format invariants both schemas keep


@SCHEMAS
@pytest.mark.parametrize("vocab", [151_552, 2**24 - 1])
def test_round_trip_bounds_large_vocabularies(tmp_path: Path, vocab: int, schema: int) -> None:
    refs = write_synthetic(
        tmp_path, vocab, seq_len=32, num=12, k=8, shard_tokens=5 * 32, chunk_entries=512, schema=schema
    )
    cache = TeacherCache(tmp_path)
    assert len(cache) == 12 and cache.max_entries == 8
    for i, (tokens, target) in refs.items():
        assert_matches(cache[i], tokens, target, tol=5e-4)  # quantisation step / 2 = 4.2e-4
    info = cache_info(tmp_path)
    assert info["schema_version"] == schema
    if schema == 3:  # (its size, on data of a realistic skew: tests/test_cache_schema3.py)
        return
    size = 4 if vocab <= 2**18 else 8
    # + fletcher32 per chunk, + the padded last chunk of each shard (the size is not known while streaming)
    assert info["bytes_per_entry"] * info["entries"] <= size * info["entries"] * (1 + 4 / 512) + 3 * 512 * size
    assert info["bytes_per_entry"] >= size


@SCHEMAS
def test_round_trip_top_p_k_from_logits(tmp_path: Path, schema: int) -> None:
    refs = write_cache(tmp_path, TopPK(0.9, 20), shard_tokens=3 * 16, schema=schema)
    cache = TeacherCache(tmp_path)
    for i, (tokens, target) in refs.items():
        assert_matches(cache[i], tokens, target)
    item = cache.read(4, start=5, stop=11)  # a window of positions
    assert torch.equal(item["teacher_ids"], cache[4]["teacher_ids"][5:11])
    assert torch.equal(item["labels"], refs[4][0][6:12])


@SCHEMAS
def test_unlimited_top_p_and_sampled_caches(tmp_path: Path, schema: int) -> None:
    refs = write_cache(tmp_path / "p", TopPK(0.8, None), vocab=200, schema=schema)
    cache = TeacherCache(tmp_path / "p")
    assert cache.spec.max_entries is None
    assert cache.max_entries == max(int(t.valid.sum(-1).max()) for _, t in refs.values())
    for i, (tokens, target) in refs.items():
        assert_matches(cache[i], tokens, target)
    write_cache(tmp_path / "s", Sampled(n=12), vocab=200, schema=schema)
    item = TeacherCache(tmp_path / "s")[3]
    assert item["teacher_ids"].shape[1] == 12
    torch.testing.assert_close(item["teacher_logprobs"].exp().sum(-1), torch.ones(16), atol=12e-3, rtol=0)


def test_storage_bounds_for_small_vocabularies(tmp_path: Path) -> None:
    """Schema 2's packed entries (schema 3's size: tests/test_cache_schema3.py)."""
    write_synthetic(tmp_path, vocab=2**18, seq_len=64, num=40, k=40, chunk_entries=2048, schema=2)
    info = cache_info(tmp_path)
    with h5py.File(TeacherCache(tmp_path).files[0]) as f:
        entries = f["entries"]
        assert entries.dtype == np.uint32 and f["counts"].dtype == np.uint8
        chunks = -(-entries.shape[0] // entries.chunks[0])
        storage = entries.id.get_storage_size()
    # 4 B/entry + fletcher32 per chunk + the padded last chunk
    assert storage <= 4 * entries.shape[0] + 4 * chunks + 4 * 2048
    assert info["bytes_per_entry"] <= 4.005 + 4 * 2048 / entries.shape[0]
    assert info["bookkeeping_bytes_per_token"] <= 2.0
    assert info["stats_bytes_per_token"] <= 6.01  # three float16 per position (std, entropy, tail), no gammas


# --------------------------------------------------------------------------------------------- shards and readers
@SCHEMAS
def test_multi_shard_any_reader_layout(tmp_path: Path, schema: int) -> None:
    refs = write_cache(tmp_path, TopPK(0.9, 12), num=11, world=3, shard_tokens=2 * 16, schema=schema)  # 6 shards
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.json"] + [f"shard-00000{j}.h5" for j in range(6)]  # rank indexes replaced
    with h5py.File(tmp_path / "shard-000002.h5") as f:
        assert f["sequence_index"][:].tolist() == [4, 5] and f.attrs["complete"]
    for readers in (1, 2, 4):  # reader ranks each take their stride of the indices
        for r in range(readers):
            cache = TeacherCache(tmp_path)
            for i in range(r, 11, readers):
                assert_matches(cache[i], *refs[i])
    # at most MAX_OPEN_SHARDS files stay open per process, whatever the number of shards read
    from pd_lightning.cache import reader as cache_reader

    cache, limit = TeacherCache(tmp_path), cache_reader.MAX_OPEN_SHARDS
    try:
        cache_reader.MAX_OPEN_SHARDS = 2
        for i in [10, 0, 5, 3, 9, 1, 7]:
            assert_matches(cache[i], *refs[i])
            assert len(cache._shards) <= 2
    finally:
        cache_reader.MAX_OPEN_SHARDS = limit
    assert verify(tmp_path) == {"shards": 6, "sequences": 11, "tokens": 11 * 16, "entries": verify(tmp_path)["entries"]}
    # the content does not depend on the number of writer ranks
    write_cache(tmp_path / "one", TopPK(0.9, 12), num=11, world=1, shard_tokens=2 * 16, schema=schema)
    assert content_checksum(tmp_path / "one") == content_checksum(tmp_path)
    refs = write_cache(tmp_path / "sparse", TopPK(0.9, 12), num=2, world=3, schema=schema)  # more ranks than shards
    cache = TeacherCache(tmp_path / "sparse")
    for i in range(2):
        assert_matches(cache[i], *refs[i])


def test_n_writers_m_readers_and_partial_reading(tmp_path: Path, capsys) -> None:
    """3 writer ranks, one of them unfinished: refused by default, readable with allow_partial over the finished
    shards; the rank-aware sampler of 1, 2 and 3 reader ranks gives every finished sequence exactly once."""
    from pd_lightning.cache.datamodule import CacheDataModule
    from pd_lightning.corpus.sampler import ResumableSampler

    proc = TopPK(0.9, 12)
    spec = make_spec(proc, 300, 16, 14, shard_tokens=2 * 16)  # 7 shards; rank r of 3 writes r, r + 3, ...
    data = {i: sequence_data(i, 300, 16) for i in range(14)}
    for rank in (0, 2):  # rank 1 (shards 1 and 4: sequences 2, 3, 8, 9) never ran
        writer = CacheWriter(tmp_path, spec, rank=rank, world_size=3)
        for i in range(14):
            writer.write(torch.tensor([i]), data[i][0], proc(data[i][1]))
        writer.finalize()
    with pytest.raises(CacheIncompleteError, match=r"10 of 14 sequences.*--data.allow_partial true"):
        CacheDataModule(path=str(tmp_path))
    capsys.readouterr()
    dm = CacheDataModule(path=str(tmp_path), allow_partial=True, batch_size=1, shuffle=True)
    notice = capsys.readouterr().err  # training on a subset is said, once
    assert notice.count("pd-lightning: warning: --data.allow_partial: training on 10 of 14 sequences") == 1
    finished = [i for i in range(14) if i not in (2, 3, 8, 9)]
    assert len(dm.cache) == 10 and dm.cache.sequences.tolist() == finished
    tokens = {tuple(dm.cache[p]["input_ids"].tolist()): p for p in range(len(dm.cache))}
    for i in finished:
        assert tuple(data[i][0][0, :-1].tolist()) in tokens
    for readers in (1, 2, 5):
        seen = []
        for r in range(readers):
            seen += list(ResumableSampler(len(dm.cache), True, 7, r, readers))
        assert sorted(seen) == list(range(10)), readers  # every finished sequence exactly once per epoch
    # the missing rank finishes the cache: complete, equal to a single-writer cache
    writer = CacheWriter(tmp_path, spec, rank=1, world_size=3)
    assert writer.pending_sequences.tolist() == [2, 3, 8, 9]
    for i in (2, 3, 8, 9):
        writer.write(torch.tensor([i]), data[i][0], proc(data[i][1]))
    assert writer.finalize() == tmp_path / "index.json"
    write_cache(tmp_path / "one", proc, num=14, shard_tokens=2 * 16)
    assert content_checksum(tmp_path) == content_checksum(tmp_path / "one")


def test_partial_snapshot_is_checkpointed_and_a_resume_reads_it(tmp_path: Path, capsys) -> None:
    """allow_partial: a resumed run reads the shards its checkpoint trained on, also after the cache grew (said in one
    warning); a snapshot whose shards are not finished in the folder is refused with one message."""
    from pd_lightning.cache.datamodule import CacheDataModule, _spec_digest

    proc = TopPK(0.9, 12)
    spec = make_spec(proc, 300, 16, 14, shard_tokens=2 * 16)  # 7 shards of 2 sequences
    data = {i: sequence_data(i, 300, 16) for i in range(14)}

    def write(rank: int) -> None:
        writer = CacheWriter(tmp_path, spec, rank=rank, world_size=3)
        for i in range(14):
            writer.write(torch.tensor([i]), data[i][0], proc(data[i][1]))
        writer.finalize()

    write(0)  # shards 0, 3, 6: sequences 0, 1, 6, 7, 12, 13
    dm = CacheDataModule(path=str(tmp_path), allow_partial=True, batch_size=1)
    state = {"epoch": 0, "consumed": 2, "seed": 5, "cache_spec": _spec_digest(dm.cache), "cache_shards": [0, 3, 6]}
    write(2)  # the cache grows: shards 2 and 5 finished too
    grown = CacheDataModule(path=str(tmp_path), allow_partial=True, batch_size=1)
    assert len(grown.cache) == 10
    capsys.readouterr()
    grown.load_state_dict(state)
    assert grown.cache.sequences.tolist() == [0, 1, 6, 7, 12, 13] and not grown.cache.complete
    assert "resuming on the 6 sequences" in capsys.readouterr().err
    assert torch.equal(grown.cache[2]["input_ids"], data[6][0][0, :-1])
    write(1)  # complete now: the checkpoint's snapshot is still the one read
    done = CacheDataModule(path=str(tmp_path), batch_size=1)
    done.load_state_dict(state)
    assert len(done.cache) == 6 and done.cache.sequences.tolist() == [0, 1, 6, 7, 12, 13]
    other = tmp_path / "other"  # a copy of the cache in which shard 3 is not finished
    writer = CacheWriter(other, spec, rank=0, world_size=3)
    writer.write(torch.tensor([0]), data[0][0], proc(data[0][1]))
    writer.write(torch.tensor([1]), data[1][0], proc(data[1][1]))
    writer.close()
    bad = CacheDataModule(path=str(other), allow_partial=True, batch_size=1)
    with pytest.raises(CacheIncompleteError, match=r"the checkpoint's snapshot reads shard\(s\) \[3, 6\]"):
        bad.load_state_dict(state)


@SCHEMAS
def test_resume_with_another_number_of_writer_ranks(tmp_path: Path, schema: int) -> None:
    """Started on 3 ranks (only rank 1 finished its shards), finished on 2: same content as one writer."""
    proc = TopPK(0.9, 12)
    spec = make_spec(proc, 300, 16, 10, shard_tokens=2 * 16)  # 5 shards
    data = {i: sequence_data(i, 300, 16) for i in range(10)}

    def feed(writer: CacheWriter) -> None:
        for i in range(10):
            writer.write(torch.tensor([i]), data[i][0], proc(data[i][1]))

    feed(CacheWriter(tmp_path, spec, rank=1, world_size=3, schema=schema))  # shards 1 and 4
    for rank in (0, 1):
        writer = CacheWriter(tmp_path, spec, rank=rank, world_size=2, schema=schema)
        assert writer.pending_sequences.tolist() == ([0, 1, 4, 5] if rank == 0 else [6, 7])  # shards 0, 2 / 3
        feed(writer)
        writer.finalize()
    assert (tmp_path / "index.json").exists() and not list(tmp_path.glob("index-*.json"))
    write_cache(tmp_path / "one", proc, num=10, shard_tokens=2 * 16, schema=schema)
    assert content_checksum(tmp_path) == content_checksum(tmp_path / "one")


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(tmp_path: Path, context: str) -> None:
    refs = write_cache(tmp_path, TopPK(0.9, 12), num=9, world=2, shard_tokens=4 * 16)
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
@SCHEMAS
def test_truncated_file_is_detected(tmp_path: Path, schema: int) -> None:
    write_cache(tmp_path, TopPK(0.9, 12), num=6, schema=schema)
    shard = tmp_path / "shard-000000.h5"
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size * 6 // 10)
    for action in (TeacherCache, verify):
        with pytest.raises(CacheCorruptError, match=r"shard-000000\.h5.*truncated"):
            action(tmp_path)


@SCHEMAS
def test_flipped_byte_is_detected(tmp_path: Path, schema: int) -> None:
    write_cache(tmp_path, TopPK(0.9, 12), num=6, chunk_entries=256, schema=schema)
    shard = tmp_path / "shard-000000.h5"
    dataset = "entries" if schema == 2 else "blocks"  # the packed entries / the coded entry blocks
    with h5py.File(shard) as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as fh:
        fh.seek(offset + 17)
        byte = fh.read(1)
        fh.seek(offset + 17)
        fh.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(CacheCorruptError, match=rf"shard-000000\.h5.*'/{dataset}'"):
        verify(tmp_path)
    with pytest.raises(CacheCorruptError, match=r"shard-000000\.h5.*sequence 0"):
        TeacherCache(tmp_path)[0]
    # raised in a DataLoader worker, the error reaches the main process as one line (no worker traceback)
    loader = DataLoader(TeacherCache(tmp_path), batch_size=2, num_workers=1)
    with pytest.raises(CacheCorruptError) as err:
        list(loader)
    assert "\n" not in str(err.value) and "shard-000000.h5" in str(err.value) and "Traceback" not in str(err.value)


def test_non_finite_statistics_refused_at_write_and_detected_at_read(tmp_path: Path) -> None:
    proc = TopPK(0.9, 8)
    tokens, logits = sequence_data(0, 300, 16)
    target = proc(logits)
    target.std[3] = float("nan")
    writer = CacheWriter(tmp_path / "w", make_spec(proc, 300, 16, 1))
    with pytest.raises(ValueError, match=r"non-finite teacher statistic 'std' at sequence 0, position 3"):
        writer.write(torch.tensor([0]), tokens, target)
    write_cache(tmp_path / "c", proc, num=3)
    with h5py.File(tmp_path / "c" / "shard-000000.h5", "r+") as f:  # a NaN written behind the writer's back
        f["std"][20] = np.nan
    with pytest.raises(CacheCorruptError, match=r"shard-000000\.h5.*non-finite.*std.*position 20"):
        cache_info(tmp_path / "c")
    with pytest.raises(CacheCorruptError, match=r"shard-000000\.h5.*non-finite.*std"):
        verify(tmp_path / "c")
    TeacherCache(tmp_path / "c")[0]  # sequence 0 holds positions 0-15: fine
    with pytest.raises(
        CacheCorruptError, match=r"shard-000000\.h5 holds a non-finite teacher statistic \(teacher_std\) in sequence 1"
    ):  # noqa: E501
        TeacherCache(tmp_path / "c")[1]


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


def test_incomplete_and_inconsistent_caches_are_refused(tmp_path: Path) -> None:
    proc = TopPK(0.9, 8)
    spec = make_spec(proc, 300, 16, 6, shard_tokens=2 * 16)  # shards {0, 1}, {2, 3}, {4, 5}
    writer = CacheWriter(tmp_path, spec)
    for i in (0, 1, 2):
        tokens, logits = sequence_data(i, 300, 16)
        writer.write(torch.tensor([i]), tokens, proc(logits))
    with pytest.raises(CacheIncompleteError, match=r"unfinished \(2 of 6 sequences.*rerun `pd-lightning predict`"):
        TeacherCache(tmp_path)
    info = cache_info(tmp_path)
    assert info["complete"] is False and info["finished_sequences"] == 2 and "2 of 6" in info["reason"]
    with pytest.raises(CacheIncompleteError, match=r"4 sequences of this rank's shards were never written"):
        writer.finalize()
    assert not list(tmp_path.glob("*.tmp"))  # the partly written shard was dropped

    full = tmp_path / "full"
    write_cache(full, proc, num=6, shard_tokens=2 * 16)
    # the index names a shard that is missing
    (full / "shard-000001.h5").rename(tmp_path / "aside.h5")
    with pytest.raises(CacheCorruptError, match=r"index names shard-000001\.h5, which is missing.*rerun"):
        TeacherCache(full)
    (tmp_path / "aside.h5").rename(full / "shard-000001.h5")
    # a shard of another cache mixed into the folder
    write_cache(tmp_path / "other", TopPK(0.9, 9), num=8, shard_tokens=2 * 16)
    (tmp_path / "other" / "shard-000003.h5").rename(full / "shard-000003.h5")
    with pytest.raises(CacheMismatchError, match=r"mixes two caches: shard-000003\.h5.*max_entries: 9 != 8"):
        TeacherCache(full)
    (full / "shard-000003.h5").unlink()
    # an index that names a shard of another spec (a shard file swapped in)
    (tmp_path / "other" / "shard-000002.h5").replace(full / "shard-000002.h5")
    with pytest.raises(CacheMismatchError, match=r"shard-000002\.h5 was written with other parameters"):
        TeacherCache(full)
    # a schema-1 cache is refused with what to do
    old = tmp_path / "old"
    old.mkdir()
    (old / "shard-00000-of-00001.h5").write_bytes(b"")
    with pytest.raises(CacheMismatchError, match=r"schema-1 teacher cache.*pd-lightning predict"):
        TeacherCache(old)
    # a file instead of a folder
    with pytest.raises(Exception, match=r"is a file, not a teacher cache folder"):
        TeacherCache(full / "index.json")


@SCHEMAS
def test_other_parameters_are_refused_same_are_complete(tmp_path: Path, schema: int) -> None:
    write_cache(tmp_path, TopPK(0.9, 8), num=4, schema=schema)
    before = content_checksum(tmp_path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(
        CacheMismatchError, match=r"other parameters \(max_entries: 8 != 9; processor.*--writer\.overwrite true"
    ):  # noqa: E501
        CacheWriter(tmp_path, make_spec(TopPK(0.9, 9), 300, 16, 4), schema=schema)
    with pytest.raises(CacheMismatchError, match=r"teacher_fingerprint: 'teacher-a' != 'teacher-b'"):
        CacheWriter(tmp_path, make_spec(TopPK(0.9, 8), 300, 16, 4, teacher="teacher-b"), schema=schema)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing and content_checksum(tmp_path) == before
    same = CacheWriter(tmp_path, make_spec(TopPK(0.9, 8), 300, 16, 4), schema=schema)
    assert same.complete and len(same.pending_sequences) == 0  # a producer has nothing to compute
    tokens, logits = sequence_data(0, 300, 16)
    assert same.write(torch.tensor([0]), tokens, TopPK(0.9, 8)(logits)) == 0
    assert same.finalize() == tmp_path / "index.json" and content_checksum(tmp_path) == before
    other = CacheWriter(tmp_path, make_spec(TopPK(0.9, 9), 300, 16, 4), overwrite=True, schema=schema)
    assert not other.complete and not list(tmp_path.iterdir())
    # an interrupted run of other parameters is refused as well
    other = CacheWriter(tmp_path, make_spec(TopPK(0.9, 9), 300, 16, 4, shard_tokens=16), schema=schema)
    other.write(torch.tensor([0]), tokens, TopPK(0.9, 9)(logits))
    other.close()
    with pytest.raises(CacheMismatchError, match=r"holds a teacher cache written with other parameters"):
        CacheWriter(tmp_path, make_spec(TopPK(0.9, 8), 300, 16, 4), schema=schema)


@SCHEMAS
def test_writer_skips_foreign_repeated_and_finished_sequences(tmp_path: Path, schema: int) -> None:
    proc = TopPK(0.9, 8)
    spec = make_spec(proc, 300, 16, 8, shard_tokens=2 * 16)  # rank 1 of 2 writes shards 1, 3: {2, 3}, {6, 7}
    writer = CacheWriter(tmp_path, spec, rank=1, world_size=2, schema=schema)
    data = [sequence_data(i, 300, 16) for i in range(8)]

    def batch(idx: list[int]) -> tuple:
        return (
            torch.tensor(idx),
            torch.cat([data[i][0] for i in idx]),
            proc(torch.cat([data[i][1] for i in idx])),
        )

    assert writer.write(*batch([0, 2, 3, 3])) == 2  # 0 is rank 0's, the second 3 a repeat
    assert writer.pending_sequences.tolist() == [6, 7]  # shard 1 is finished
    assert writer.write(*batch([2, 7])) == 1  # 2 is in a finished shard; 7 is held until 6 arrives
    assert writer.write(*batch([6, 5])) == 1
    writer.finalize()
    cache_dir = tmp_path / "ref"
    write_cache(cache_dir, proc, num=8, world=2, shard_tokens=2 * 16, schema=schema)
    for name in ("shard-000001.h5", "shard-000003.h5"):
        assert content_checksum(tmp_path / name) == content_checksum(cache_dir / name)


@SCHEMAS
def test_checksum_independent_of_order_and_layout(tmp_path: Path, schema: int) -> None:
    proc = TopPK(0.95, 10)
    write_cache(tmp_path / "a", proc, num=9, schema=schema)
    spec = make_spec(proc, 300, 16, 9)
    writer = CacheWriter(tmp_path / "b", spec, write_sequences=4, chunk_entries=100, schema=schema)
    for i in [5, 2, 8, 0, 1, 7, 3, 6, 4]:
        tokens, logits = sequence_data(i, 300, 16)
        writer.write(torch.tensor([i]), tokens, proc(logits, torch.arange(16) + i * 16))
    writer.finalize()
    assert content_checksum(tmp_path / "a") == content_checksum(tmp_path / "b")
    write_cache(tmp_path / "c", TopPK(0.95, 11), num=9, schema=schema)
    assert content_checksum(tmp_path / "a") != content_checksum(tmp_path / "c")


# --------------------------------------------------------------------------------------------- resume after SIGKILL
WRITER_SCRIPT = """
import sys, time, torch
from pd_lightning.cache import CacheSpec, CacheWriter
from pd_lightning.distill.processors import TopPK

folder, sleep = sys.argv[1], float(sys.argv[2])
V, L, N = 400, 32, 24
proc = TopPK(0.9, 16)
spec = CacheSpec.for_processor(proc, vocab_size=V, seq_len=L, num_sequences=N, teacher_fingerprint="t",
                               tokenizer_fingerprint="tok", source_fingerprint="src", shard_tokens=3 * L,
                               power_gammas=[0.5])
writer = CacheWriter(folder, spec, write_sequences=2)
written = 0
for start in range(0, N, 2):  # every sequence is offered; the writer skips finished ones
    idx = list(range(start, start + 2))
    gens = [torch.Generator().manual_seed(i) for i in idx]
    tokens = torch.stack([torch.randint(0, V, (L + 1,), generator=g) for g in gens])
    logits = torch.stack([torch.randn(L, V, generator=g) * 3 for g in gens])
    written += writer.write(torch.tensor(idx), tokens, proc(logits, gammas=(0.5,)))
    time.sleep(sleep)
writer.finalize()
print("written", written, flush=True)
"""


def _run_writer(script: Path, folder: Path, sleep: float, kill_at: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if kill_at:
        env["PD_LIGHTNING_TEST_KILL_AT"] = kill_at
    return subprocess.Popen([sys.executable, str(script), str(folder), str(sleep)], stdout=subprocess.PIPE, env=env)


@pytest.fixture(scope="module")
def writer_script(tmp_path_factory) -> tuple[Path, Path]:
    """The writer script and its uninterrupted cache."""
    folder = tmp_path_factory.mktemp("writer")
    script = folder / "writer.py"
    script.write_text(textwrap.dedent(WRITER_SCRIPT))
    assert _run_writer(script, folder / "reference", 0.0).wait(timeout=120) == 0
    return script, folder / "reference"


@pytest.mark.parametrize(
    "kill_at",
    [
        "external",
        pytest.param("mid_shard:3", marks=pytest.mark.slow),
        "before_rename:2",
        "after_rename:3",
        pytest.param("after_index:8", marks=pytest.mark.slow),  # also through the CLI in test_predict.py
    ],
)
def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path, writer_script, kill_at: str) -> None:
    """SIGKILL after some shards (external kill), during a shard's final write, after the rename but before the
    index update, and after the last shard but before index.json: the rerun gives the uninterrupted content."""
    script, reference = writer_script
    out = tmp_path / "resumed"
    if kill_at == "external":
        killed = _run_writer(script, out, 0.25)
        deadline = time.monotonic() + 60
        while len(list(out.glob("shard-*.h5"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        killed.send_signal(signal.SIGKILL)
    else:
        killed = _run_writer(script, out, 0.0, kill_at)
    killed.wait(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    finished = len(list(out.glob("shard-*.h5")))  # every shard is 3 sequences
    assert not (out / "index.json").exists()
    if kill_at == "after_index:8":  # every shard indexed, only index.json missing: readable, finished by a rerun
        assert finished == 8 and len(TeacherCache(out)) == 24
    else:
        assert 1 <= finished < 8, finished
        if kill_at == "before_rename:2":
            assert (out / "shard-000001.h5.tmp").exists()
        with pytest.raises(CacheIncompleteError):
            TeacherCache(out)
    resumed = _run_writer(script, out, 0.0)
    stdout, _ = resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    written = int(stdout.split()[-1])
    assert written == 24 - 3 * finished  # only the unfinished shards were computed again
    assert sorted(p.name for p in out.iterdir()) == ["index.json"] + [f"shard-00000{j}.h5" for j in range(8)]
    assert content_checksum(out) == content_checksum(reference)
    verify(out)


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
    with pytest.raises(ValueError, match="background cache writer .* failed.*vocab_size=200") as err:
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
    assert info["shards"] == info["num_shards"] == 1
    assert info["bytes_per_token"] == pytest.approx(info["bytes"] / tokens)
    assert info["processor"] == {
        "class_path": "pd_lightning.distill.processors.TopPK",
        "init_args": {"p": 0.9, "k": 20},
    }
    # on a cache of many shards: totals from the index for all shards, statistics from a sample of them
    write_cache(tmp_path / "many", TopPK(0.9, 20), num=8, shard_tokens=16)  # 8 shards
    full, sampled = cache_info(tmp_path / "many"), cache_info(tmp_path / "many", sample_shards=3)
    assert full["sampled_shards"] == 8 and sampled["sampled_shards"] == 3
    assert sampled["tokens"] == full["tokens"] == tokens and sampled["entries"] == full["entries"] == info["entries"]
    assert sampled["bytes"] == full["bytes"] and sum(sampled["entries_histogram"].values()) == 3 * 16
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
