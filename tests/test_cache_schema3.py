"""Schema 3 of the teacher cache (issue 19): coded entry blocks hold exactly schema 2's quantised values.

- round trips: every read of a schema-3 cache equals the same read of a schema-2 cache of the same targets, bit for
  bit, and the fp64 reference within the quantisation bound; on random and on realistic (skewed, top-p-k)
  distributions, with the rows that stress the coding (1 entry, k entries, ties, p = 1, ids 0 and V - 1, ids above
  2^17 and 2^18), sequences of several blocks, windows across block boundaries, shards smaller than the id table's
  sample, several shards; the stored statistics unchanged;
- size: fewer bytes per entry than schema 2 on realistic data;
- the shard's bytes do not depend on batching, buffering, chunking or the number of writer ranks;
- bad input: truncated or corrupt coded streams (caught by fletcher32, or, where the HDF5 checksums were recomputed,
  by the codec's own checks), an unknown schema, a folder mixing schemas: one error line naming the shard or
  folder, exit code 2, nothing changed (through the CLI) and CacheCorruptError / CacheMismatchError (the API);
- the writer refuses to continue the other schema's cache of the same spec, naming ``--writer.schema``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pd_lightning.cache import (
    CacheCorruptError,
    CacheMismatchError,
    CacheSpec,
    CacheWriter,
    TeacherCache,
    cache_info,
    content_checksum,
    verify,
)
from pd_lightning.cache.format import BLOCK_POSITIONS, NLOGP_MAX, TABLE_POSITIONS, code_step
from pd_lightning.distill.processors import TopPK
from pd_lightning.distill.target import SparseTarget

ROOT = Path(__file__).resolve().parents[1]
STEP = code_step(NLOGP_MAX)  # -log p step of both schemas: ln(1e6) / 16383
# |stored - fp64 reference|: half a step, plus the float32 rounding of the target given to the writer and of the
# decoded value (each at most half an ulp of a value below ln(1e6) < 16: 2^-20)
BOUND = STEP / 2 + 2 * 2.0**-20
KEYS = ("input_ids", "labels", "teacher_ids", "teacher_logprobs", "teacher_std", "teacher_entropy", "teacher_tail")


def make_spec(vocab: int, seq_len: int, num: int, k: int | None, shard_tokens: int = 1 << 20, gammas=()) -> CacheSpec:
    return CacheSpec.for_processor(
        TopPK(0.95, k), vocab_size=vocab, seq_len=seq_len, num_sequences=num, teacher_fingerprint="teacher-a",
        tokenizer_fingerprint="tok-1", source_fingerprint="train:abc", shard_tokens=shard_tokens, power_gammas=gammas,
    )  # fmt: skip


def write(folder: Path, spec: CacheSpec, tokens: torch.Tensor, target: SparseTarget, schema: int, batch: int = 1,
          order=None, **kw) -> None:  # fmt: skip
    """Write ``num`` sequences (``tokens`` ``(S, L + 1)``, ``target`` of ``S * L`` rows) in batches of ``batch``."""
    length, num = spec.seq_len, spec.num_sequences
    order = list(range(num)) if order is None else list(order)
    writer = CacheWriter(folder, spec, schema=schema, **kw)
    for a in range(0, num, batch):
        idx = torch.tensor(order[a : a + batch])
        rows = (idx[:, None] * length + torch.arange(length)).reshape(-1)
        writer.write(idx, tokens[idx], target.select(rows))
    writer.finalize()


def both_schemas(tmp_path: Path, spec: CacheSpec, tokens, target, **kw) -> tuple[TeacherCache, TeacherCache]:
    for schema in (2, 3):
        write(tmp_path / f"s{schema}", spec, tokens, target, schema, **kw)
    return TeacherCache(tmp_path / "s2"), TeacherCache(tmp_path / "s3")


def assert_same_reads(c2: TeacherCache, c3: TeacherCache, i: int, start: int = 0, stop: int | None = None) -> dict:
    a, b = c2.read(i, start, stop), c3.read(i, start, stop)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (key, i, start, stop)
    return b


def assert_within_bound(item: dict, target: SparseTarget, ref_logprobs: torch.Tensor, rows: torch.Tensor) -> None:
    """``item``'s entries are ``target``'s at ``rows``: ids exact, log p within :data:`BOUND` of the fp64 reference
    ``ref_logprobs`` (clamped at 1e-6, the format's range), padding ``-inf`` / 0."""
    valid = target.valid[rows]
    n = valid.sum(-1)
    k = item["teacher_ids"].shape[1]
    pad = torch.arange(k)[None] >= n[:, None]  # (the targets' entries are front-packed, like the cache's)
    assert torch.equal(item["teacher_ids"][~pad], target.ids[rows][valid])
    ref = ref_logprobs[rows][valid].double().clamp(min=-NLOGP_MAX)
    err = (item["teacher_logprobs"][~pad].double() - ref).abs()
    assert err.numel() == 0 or float(err.max()) <= BOUND, float(err.max())
    assert torch.isneginf(item["teacher_logprobs"][pad]).all() and (item["teacher_ids"][pad] == 0).all()


# --------------------------------------------------------------------------------------------- targets
def random_target(g: torch.Generator, n: int, k: int, vocab: int) -> tuple[SparseTarget, torch.Tensor]:
    """Random rows (unsorted -log p, ids anywhere) with the rows that stress the coding; also the fp64 log p."""
    ids = torch.randint(0, vocab, (n, k), generator=g)  # uniform: no skew for the id table to use
    nlogp = torch.rand(n, k, generator=g, dtype=torch.float64) * 16  # some beyond ln(1e6): clamped
    counts = torch.randint(1, k + 1, (n,), generator=g)
    counts[0], counts[1], counts[2], counts[3] = 1, k, k, 1  # 1 entry, exactly k entries
    ids[1, 0], ids[1, 1], ids[1, -1] = vocab - 1, 0, vocab // 2  # the id range's edges
    nlogp[2, :] = 2.5  # ties: every entry equal
    nlogp[3, 0] = 0.0  # p = 1.0: one token with all the mass
    nlogp[4, : k // 2] = 0.75  # ties at the head, then random
    ids[5, 0], ids[6, 0] = 2**17 + 7 if vocab > 2**17 else vocab - 2, 2**18 + 3 if vocab > 2**18 else vocab - 3
    valid = torch.arange(k)[None] < counts[:, None]
    ref = (-nlogp).masked_fill(~valid, -math.inf)
    target = SparseTarget(
        ids=ids.masked_fill(~valid, 0),
        logprobs=ref.float(),
        std=torch.rand(n, generator=g) * 8,
        entropy=torch.rand(n, generator=g) * 11,
        tail=torch.rand(n, generator=g) * 0.3,
        power_sums={0.5: 1 + torch.rand(n, generator=g) * 50},
    )
    return target, ref


def skewed_logits(n: int, vocab: int, seed: int, s: float = 1.2) -> torch.Tensor:
    """``(n, V)`` teacher-like logits: a Zipf-shaped head over one shared frequency order, plus noise per row."""
    g = torch.Generator().manual_seed(seed)
    base = -s * torch.arange(1, vocab + 1, dtype=torch.float64).log()
    order = torch.randperm(vocab, generator=g)
    z = base[None, :] + torch.randn(n, vocab, generator=g, dtype=torch.float64)
    return z[:, order]


def realistic_target(
    n: int, k: int, vocab: int, seed: int, small_vocab: int = 2048, s: float = 1.2
) -> tuple[SparseTarget, torch.Tensor]:
    """TopPK(0.95, k) of a real softmax over ``small_vocab`` skewed logits (sorted rows, 1..k entries), its ids mapped
    through a fixed random one-to-one map into ``[0, vocab)`` (the skew kept, no id locality); the fp64 log p."""
    logits = skewed_logits(n, small_vocab, seed, s)
    logits[0] = -1e4
    logits[0, 5] = 30.0  # p = 1.0 in float32: one entry
    logits[1, :] = 0.0  # uniform: ties, and top-p needs every entry up to k
    target = TopPK(0.95, k)(logits.float(), gammas=(0.5,))
    # the fp64 reference of the teacher's (float32) logits
    ref = torch.log_softmax(logits.float().double(), -1).gather(1, target.ids).masked_fill(~target.valid, -math.inf)
    g = torch.Generator().manual_seed(seed + 1)
    vmap = torch.randperm(vocab, generator=g)[:small_vocab]
    frequent = int(torch.bincount(target.ids[target.valid], minlength=small_vocab).argmax())
    for small, big in ((frequent, 0), (5, vocab - 1)):  # the edges of the id range: the most frequent id, p = 1
        at = (vmap == big).nonzero().flatten()
        if at.numel():
            vmap[at] = vmap[small].clone()
        vmap[small] = big
    assert vmap.unique().numel() == small_vocab
    target.ids = torch.where(target.valid, vmap[target.ids], 0)
    return target, ref


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    ("vocab", "seq_len", "num", "k", "shard_seqs"),
    [
        (300, 64, 11, 12, 5),  # 3 shards, each smaller than the id table's sample (32 sequences of 64)
        (151_552, 64, 6, 8, 4),  # ids above 2^17; escaped ranks
        (300_000, 16, 5, 6, 5),  # ids above 2^18 (schema 2: uint64 entries)
        (1000, 2500, 3, 5, 2),  # 2 blocks per sequence; the table from the first sequence
        (4000, 4200, 2, 3, 1),  # 3 blocks per sequence (the last one short); a shard per sequence
    ],
)
def test_random_round_trip_equals_schema2(tmp_path: Path, vocab, seq_len, num, k, shard_seqs) -> None:
    g = torch.Generator().manual_seed(vocab + seq_len)
    target, ref = random_target(g, num * seq_len, k, vocab)
    tokens = torch.randint(0, vocab, (num, seq_len + 1), generator=g)
    tokens[0, 0], tokens[0, 1] = 0, vocab - 1
    spec = make_spec(vocab, seq_len, num, k, shard_tokens=shard_seqs * seq_len, gammas=(0.5,))
    c2, c3 = both_schemas(tmp_path, spec, tokens, target, batch=2)
    assert c3.layout.schema == 3 and c2.layout.schema == 2 and c3.spec.num_shards == -(-num // shard_seqs)
    for i in range(num):
        item = assert_same_reads(c2, c3, i)
        rows = torch.arange(i * seq_len, (i + 1) * seq_len)
        assert_within_bound(item, target, ref, rows)
        assert torch.equal(item["input_ids"], tokens[i, :-1]) and torch.equal(item["labels"], tokens[i, 1:])
    # windows, across and at the block boundaries (2048, 4096) and inside a block
    edges = sorted({0, 1, seq_len // 2, seq_len - 1, seq_len} | {b for b in (2047, 2048, 2049, 4095, 4096, 4097)
                                                                  if b < seq_len})  # fmt: skip
    for i in (0, num - 1):
        full = c3.read(i)
        for start in edges[:-1]:
            for stop in [e for e in edges if e > start]:
                item = assert_same_reads(c2, c3, i, start, stop)
                for key in KEYS[2:]:
                    assert torch.equal(item[key], full[key][start:stop]), (key, start, stop)
                assert torch.equal(item["labels"], tokens[i, start + 1 : stop + 1])
    # the stored statistics and bookkeeping are the same datasets, byte for byte
    for f2, f3 in zip(c2.files, c3.files):
        with h5py.File(f2) as a, h5py.File(f3) as b:
            for name in ("sequence_index", "sequence_offsets", "tokens", "counts", "std", "entropy", "tail",
                         "power_sum"):  # fmt: skip
                assert a[name].dtype == b[name].dtype and np.array_equal(a[name][:], b[name][:]), name
            assert b.attrs["num_entries"] == a["entries"].shape[0] == a.attrs["num_entries"]
            assert b["block_offsets"].shape == (b["tokens"].shape[0] * -(-seq_len // BLOCK_POSITIONS) + 1,)
    for folder in (tmp_path / "s2", tmp_path / "s3"):
        assert verify(folder)["entries"] == int(target.valid.sum())


def test_positions_and_blocks_without_entries(tmp_path: Path) -> None:
    """Rows of 0 entries (a sampled or filtered teacher): a position, a whole sequence (two empty blocks), a last
    block; the empty blocks still code (a header and empty frames) and read back as padding."""
    vocab, seq_len, num, k = 1000, 2100, 3, 5
    g = torch.Generator().manual_seed(8)
    target, ref = random_target(g, num * seq_len, k, vocab)
    empty = torch.zeros(num * seq_len, dtype=torch.bool)
    empty[7] = True
    empty[seq_len : 2 * seq_len] = True
    empty[2 * seq_len + BLOCK_POSITIONS :] = True
    target.logprobs = target.logprobs.masked_fill(empty[:, None], -math.inf)
    target.ids = target.ids.masked_fill(~target.valid, 0)
    tokens = torch.randint(0, vocab, (num, seq_len + 1), generator=g)
    spec = make_spec(vocab, seq_len, num, k, gammas=(0.5,))
    c2, c3 = both_schemas(tmp_path, spec, tokens, target)
    for i in range(num):
        for start, stop in ((0, None), (0, 2048), (2000, 2100), (2048, 2100)):
            assert_same_reads(c2, c3, i, start, stop)
        assert_within_bound(c3[i], target, ref, torch.arange(i * seq_len, (i + 1) * seq_len))
    assert torch.isneginf(c3[1]["teacher_logprobs"]).all() and torch.isneginf(c3[0]["teacher_logprobs"][7]).all()
    assert verify(tmp_path / "s3")["entries"] == verify(tmp_path / "s2")["entries"] == int(target.valid.sum())


@pytest.mark.parametrize("vocab", [2048, 151_552])
def test_realistic_round_trip_equals_schema2(tmp_path: Path, vocab: int) -> None:
    """A real softmax of skewed logits, top-0.95-64, over 2 shards of 2 sequences of 1024 positions."""
    seq_len, num, k = 1024, 4, 64
    target, ref = realistic_target(num * seq_len, k, vocab, seed=3)
    counts = target.valid.sum(-1)
    assert int(counts[0]) == 1 and int(counts[1]) == k and int(counts.min()) == 1 and int(counts.max()) == k
    assert 1 < float(counts.float().mean()) < k  # rows of every length between
    assert float(target.logprobs[0, 0]) == 0.0  # p = 1.0
    tokens = torch.randint(0, vocab, (num, seq_len + 1), generator=torch.Generator().manual_seed(4))
    spec = make_spec(vocab, seq_len, num, k, shard_tokens=2 * seq_len, gammas=(0.5,))
    c2, c3 = both_schemas(tmp_path, spec, tokens, target, batch=3)
    for i in range(num):
        item = assert_same_reads(c2, c3, i)
        assert_within_bound(item, target, ref, torch.arange(i * seq_len, (i + 1) * seq_len))
        assert_same_reads(c2, c3, i, 100, 900)
        stats = {"teacher_std": target.std, "teacher_entropy": target.entropy, "teacher_tail": target.tail}
        for key, value in stats.items():
            torch.testing.assert_close(item[key], value[i * seq_len : (i + 1) * seq_len], rtol=1e-3, atol=1e-7)
    i2, i3 = cache_info(tmp_path / "s2"), cache_info(tmp_path / "s3")
    assert (i2["schema_version"], i3["schema_version"]) == (2, 3)
    assert i3["entries"] == i2["entries"] == int(target.valid.sum())
    assert i3["max_abs_logprob_error_bound"] == pytest.approx(STEP / 2) and i3["max_abs_logprob_error_bound"] <= 1e-3
    for key in ("entries_histogram", "mean_entries_per_token", "mean_kept_mass"):
        assert i3[key] == i2[key], key


def test_schema3_is_smaller_than_schema2_on_realistic_data(tmp_path: Path) -> None:
    """A few thousand positions of skewed teacher-like rows at a 151,552-entry vocabulary: schema 3's entries
    (coded blocks + offsets + id table) take under 3 B each (the issue's goal), schema 2's 4 B."""
    vocab, seq_len, num, k = 151_552, 512, 8, 100
    target, _ = realistic_target(num * seq_len, k, vocab, seed=11)
    tokens = torch.zeros(num, seq_len + 1, dtype=torch.long)
    spec = make_spec(vocab, seq_len, num, k, shard_tokens=4 * seq_len)  # 2 shards: 2 id tables
    both_schemas(tmp_path, spec, tokens, target, batch=num)
    i2, i3 = cache_info(tmp_path / "s2"), cache_info(tmp_path / "s3")
    assert i2["entries"] == i3["entries"] > 100_000
    assert i2["bytes_per_entry"] >= 4.0  # uint32 id << 14 | q (+ fletcher32, the padded last chunk)
    assert i3["bytes_per_entry"] <= 3.0 and i3["bytes_per_entry"] < 0.75 * i2["bytes_per_entry"], i3
    assert i3["bytes"] < i2["bytes"]


# --------------------------------------------------------------------------------------------- batching
def test_shard_bytes_do_not_depend_on_batching_or_writer_ranks(tmp_path: Path) -> None:
    """The id table counts the ids of a shard's first ceil(2048 / L) sequences whatever the batches: equal shards
    from every batch size, write buffer, chunk size, write order and number of writer ranks."""
    vocab, seq_len, num, k = 5000, 256, 20, 10  # the table's sample: 8 sequences; shards of 10
    assert -(-TABLE_POSITIONS // seq_len) == 8
    target, _ = realistic_target(num * seq_len, k, vocab, seed=5, small_vocab=1000)
    tokens = torch.randint(0, vocab, (num, seq_len + 1), generator=torch.Generator().manual_seed(6))
    spec = make_spec(vocab, seq_len, num, k, shard_tokens=10 * seq_len)
    write(tmp_path / "ref", spec, tokens, target, 3, batch=num)
    reference = content_checksum(tmp_path / "ref")
    variants = {
        "one-by-one": dict(batch=1, write_sequences=1),
        "threes": dict(batch=3, write_sequences=3),
        "sevens-buffer-5": dict(batch=7, write_sequences=5, chunk_entries=100),
        "shuffled": dict(batch=2, order=[7, 3, 0, 19, 12, 1, 2, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18]),
    }
    for name, kw in variants.items():
        write(tmp_path / name, spec, tokens, target, 3, **kw)
        assert content_checksum(tmp_path / name) == reference, name
    for rank in (1, 0):  # 2 writer ranks in one process: rank r writes shard r
        write(tmp_path / "ranks", spec, tokens, target, 3, batch=4, rank=rank, world_size=2)
    assert content_checksum(tmp_path / "ranks") == reference
    for shard in ("shard-000000.h5", "shard-000001.h5"):  # the coded blocks themselves
        with h5py.File(tmp_path / "ref" / shard) as a, h5py.File(tmp_path / "ranks" / shard) as b:
            for name in ("blocks", "block_offsets", "id_table"):
                assert np.array_equal(a[name][:], b[name][:]), name
    other, _ = realistic_target(num * seq_len, k, vocab, seed=7, small_vocab=1000)
    write(tmp_path / "other", spec, tokens, other, 3)
    assert content_checksum(tmp_path / "other") != reference


# --------------------------------------------------------------------------------------------- bad input
def small_cache(folder: Path, schema: int = 3, num: int = 6, seq_len: int = 16, world: int = 1, ranks=None) -> None:
    """A cache of 3 shards (2 sequences each) of realistic rows (1..40 entries); ``ranks``: which of ``world``
    writers ran."""
    target, _ = realistic_target(num * seq_len, 40, 300, seed=21, small_vocab=300, s=2.0)
    tokens = torch.randint(0, 300, (num, seq_len + 1), generator=torch.Generator().manual_seed(22))
    spec = make_spec(300, seq_len, num, 40, shard_tokens=2 * seq_len)
    for rank in range(world) if ranks is None else ranks:
        writer = CacheWriter(folder, spec, rank=rank, world_size=world, schema=schema)
        for i in range(num):
            rows = torch.arange(i * seq_len, (i + 1) * seq_len)
            writer.write(torch.tensor([i]), tokens[i : i + 1], target.select(rows))
        if ranks is None:
            writer.finalize()
        else:
            writer.close()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pd_lightning.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


NOISE = ("`isinstance(treespec, LeafSpec)` is deprecated", "Seed set to", "seed set to", "GPU available:",
         "TPU available:", "HPU available:", "💡 Tip:", "tensorboardX", "warnings.warn(")  # fmt: skip


def assert_one_error_line(run: subprocess.CompletedProcess, *names: str) -> str:
    lines = [s for s in run.stderr.splitlines() if s.strip() and not any(n in s for n in NOISE)]
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("pd-lightning: error: "), "\n".join(lines)
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _block_bytes(shard: Path, block: int) -> tuple[int, int]:
    with h5py.File(shard) as f:
        offsets = f["block_offsets"][:]
    return int(offsets[block]), int(offsets[block + 1])


def flip_raw(shard: Path) -> None:
    """A bit flipped in the file: the 'blocks' chunk's fletcher32 catches it."""
    with h5py.File(shard) as f:
        offset = f["blocks"].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as fh:
        fh.seek(offset + 40)
        byte = fh.read(1)
        fh.seek(offset + 40)
        fh.write(bytes([byte[0] ^ 0x08]))


def rewrite_blocks(shard: Path, change) -> None:
    """``change(blocks, offsets) -> (blocks, offsets)`` written through h5py: the HDF5 checksums are recomputed, so
    only the codec's own checks (header crc, zstd frame checksums, counts crc, sizes) can catch the damage."""
    with h5py.File(shard, "r+") as f:
        blocks, offsets = change(f["blocks"][:].copy(), f["block_offsets"][:].copy())
        f["blocks"].resize(blocks.shape)
        f["blocks"][:] = blocks
        f["block_offsets"][:] = offsets


def _flip_in_frame(blocks: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = int(offsets[2])  # the end of block 1: sequence 1 of the shard
    blocks[b - 3] ^= 0x20  # inside its last zstd frame (the frame checksum, or the data it covers)
    return blocks, offsets


def _flip_in_header(blocks: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blocks[int(offsets[1]) + 20] ^= 0x01  # n_entries: the header's crc
    return blocks, offsets


def _truncate_block(blocks: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block 1 loses its last 5 bytes; the offsets after it are moved to match (a consistent, shorter stream)."""
    b = int(offsets[2])
    blocks = np.concatenate([blocks[: b - 5], blocks[b:]])
    offsets[2:] -= 5
    return blocks, offsets


def _swap_blocks(blocks: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks 0 and 1 (of sequences with other entry counts) swapped with their offsets: each is a sound block, but
    not of its row's counts (a decode that would run past its rows, or stop short)."""
    x, y, z = (int(v) for v in offsets[:3])
    blocks = np.concatenate([blocks[y:z], blocks[x:y], blocks[z:]])
    offsets[1] = x + (z - y)
    return blocks, offsets


# damage of shard 1 (sequences 2 and 3, one block each) -> (the sequence read that fails, what it says, what verify
# says); verify numbers blocks in the shard and names the sequence as readers do
CORRUPTIONS = {
    "raw-bit-flip": (flip_raw, 2, r"is corrupt \(sequence 2\)", r"dataset '/blocks' is corrupt"),
    "frame-byte": (
        lambda s: rewrite_blocks(s, _flip_in_frame),
        3,
        r"is corrupt \(sequence 3, entry block 0\): entry block plane \d is corrupt",
        r"entry block 1 \(sequence 3\) is corrupt \(entry block plane",
    ),
    "header-byte": (
        lambda s: rewrite_blocks(s, _flip_in_header),
        3,
        r"is corrupt \(sequence 3, entry block 0\): entry block header is corrupt",
        r"entry block 1 \(sequence 3\) is corrupt \(entry block header is corrupt",
    ),
    "truncated-block": (
        lambda s: rewrite_blocks(s, _truncate_block),
        3,
        r"is corrupt \(sequence 3, entry block 0\): entry block truncated",
        r"entry block 1 \(sequence 3\) is corrupt \(entry block truncated",
    ),
    "swapped-blocks": (
        lambda s: rewrite_blocks(s, _swap_blocks),
        2,
        r"is corrupt \(sequence 2, entry block 0\): counts do not match",
        r"entry block 0 \(sequence 2\) is corrupt \(counts do not match",
    ),
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_corrupt_coded_stream_is_refused(tmp_path: Path, damage: str) -> None:
    damage_fn, hit, says, verify_says = CORRUPTIONS[damage]
    folder = tmp_path / "cache"
    small_cache(folder)
    shard = folder / "shard-000001.h5"  # sequences 2 and 3
    good = TeacherCache(folder)
    before = {i: good[i] for i in range(6)}
    good.close()  # (its HDF5 chunk cache would serve the undamaged bytes)
    damage_fn(shard)
    cache = TeacherCache(folder)
    for i in (0, 1, 4, 5):  # the other shards read as before
        assert torch.equal(cache[i]["teacher_logprobs"], before[i]["teacher_logprobs"])
    with pytest.raises(CacheCorruptError, match=r"shard-000001\.h5 " + says) as err:
        cache[hit]
    assert "\n" not in str(err.value)
    with pytest.raises(CacheCorruptError, match=r"shard-000001\.h5: " + verify_says):  # (cache_info reads no block)
        verify(folder)


def test_swapped_blocks_of_equal_counts_are_refused(tmp_path: Path) -> None:
    """Every position keeps exactly k entries, so two sequences' blocks have equal counts: swapped (offsets kept
    consistent), each still decodes as a sound block of the right size. The block's place (its global number) is in
    its counts checksum, so the read of either sequence, and verify, refuse it."""
    folder = tmp_path / "cache"
    seq_len, num, k = 16, 4, 8
    proc = TopPK(1.0, k)
    logits = torch.randn(num * seq_len, 300, generator=torch.Generator().manual_seed(5)) * 2
    target = proc(logits)
    tokens = torch.randint(0, 300, (num, seq_len + 1), generator=torch.Generator().manual_seed(6))
    spec = make_spec(300, seq_len, num, k, shard_tokens=2 * seq_len)
    writer = CacheWriter(folder, spec, schema=3)
    writer.write(torch.arange(num), tokens, target)
    writer.finalize()
    shard = folder / "shard-000001.h5"  # sequences 2 and 3
    with h5py.File(shard) as f:
        assert (f["counts"][:] == k).all()
        offsets = f["block_offsets"][:]
    assert offsets[1] - offsets[0] > 0
    rewrite_blocks(shard, _swap_blocks)
    cache = TeacherCache(folder)
    for i in (2, 3):
        with pytest.raises(CacheCorruptError, match=rf"sequence {i}, entry block 0\): the entry block is not the one"):
            cache[i]
    with pytest.raises(CacheCorruptError, match=r"shard-000001\.h5: entry block 0 \(sequence 2\) is corrupt"):
        verify(folder)


def test_truncated_blocks_dataset_is_refused(tmp_path: Path) -> None:
    """The 'blocks' dataset shortened (its offsets left as written): verify names the inconsistency, a read the
    truncated block."""
    folder = tmp_path / "cache"
    small_cache(folder)
    shard = folder / "shard-000002.h5"
    with h5py.File(shard, "r+") as f:
        f["blocks"].resize((f["blocks"].shape[0] - 7,))
    with pytest.raises(CacheCorruptError, match=r"shard-000002\.h5.*'block_offsets' inconsistent with 'blocks'"):
        verify(folder)
    cache = TeacherCache(folder)
    cache[4]
    with pytest.raises(CacheCorruptError, match=r"shard-000002\.h5.*sequence 5.*truncated"):
        cache[5]


def test_unknown_schema_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    small_cache(folder)
    with h5py.File(folder / "shard-000001.h5", "r+") as f:
        f.attrs["schema_version"] = 4
    with pytest.raises(CacheMismatchError, match=r"shard-000001\.h5 is a schema-4 teacher cache.*reads schemas 2, 3"):
        TeacherCache(folder)
    with pytest.raises(CacheMismatchError, match=r"shard-000001\.h5 is a schema-4"):
        verify(folder)
    index = json.loads((folder / "index.json").read_text())
    index["schema_version"] = 4
    (folder / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheMismatchError, match=r"index\.json is a schema-4 teacher cache"):
        TeacherCache(folder)


def mixed_shard_folder(tmp_path: Path) -> Path:
    """A schema-3 cache whose shard 1 was replaced by the schema-2 shard of the same spec and data."""
    small_cache(tmp_path / "s2", schema=2)
    small_cache(tmp_path / "mixed", schema=3)
    shutil.copy(tmp_path / "s2" / "shard-000001.h5", tmp_path / "mixed" / "shard-000001.h5")
    return tmp_path / "mixed"


def mixed_index_folder(tmp_path: Path) -> Path:
    """An unfinished 2-rank cache: rank 0 wrote schema 2, rank 1 schema 3 (each in its own folder, then put
    together: the writer itself refuses to mix)."""
    small_cache(tmp_path / "r0", schema=2, world=2, ranks=[0])
    small_cache(tmp_path / "r1", schema=3, world=2, ranks=[1])
    folder = tmp_path / "mixed-index"
    shutil.copytree(tmp_path / "r0", folder)
    for p in (tmp_path / "r1").iterdir():
        if p.name.startswith(("index-", "shard-")):
            shutil.copy(p, folder / p.name)
    return folder


def test_mixed_schemas_are_refused(tmp_path: Path) -> None:
    folder = mixed_shard_folder(tmp_path)
    with pytest.raises(CacheMismatchError, match=r"shard-000001\.h5 is a schema-2 shard in a schema-3 cache"):
        TeacherCache(folder)
    with pytest.raises(CacheMismatchError, match=r"shard-000001\.h5.*schema-2"):
        verify(folder)
    folder = mixed_index_folder(tmp_path)
    assert sorted(p.name for p in folder.glob("index-*")) == ["index-00000-of-00002.json", "index-00001-of-00002.json"]
    with pytest.raises(CacheMismatchError, match=r"mixed-index mixes schema-2 and schema-3 shards.*--writer\.schema 2"):
        TeacherCache(folder, allow_partial=True)
    with pytest.raises(CacheMismatchError, match=r"mixes schema-2 and schema-3"):
        cache_info(folder)


BAD_FOLDERS = {
    "frame-byte": lambda t: _damaged(t, lambda s: rewrite_blocks(s, _flip_in_frame)),
    "raw-bit-flip": lambda t: _damaged(t, flip_raw),
    "unknown-schema": lambda t: _damaged(t, lambda s: _set_attr(s, "schema_version", 4)),
    "mixed-shards": mixed_shard_folder,
}
BAD_NAMES = {
    "frame-byte": ("shard-000001.h5", "corrupt"),
    "raw-bit-flip": ("shard-000001.h5", "checksum"),
    "unknown-schema": ("shard-000001.h5", "schema-4"),
    "mixed-shards": ("shard-000001.h5", "schema-2"),
}


def _set_attr(shard: Path, key: str, value) -> None:
    with h5py.File(shard, "r+") as f:
        f.attrs[key] = value


def _damaged(tmp_path: Path, damage) -> Path:
    folder = tmp_path / "cache"
    small_cache(folder)
    damage(folder / "shard-000001.h5")
    return folder


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_cache_info_cli_on_bad_schema3_input(tmp_path: Path, case: str) -> None:
    folder = BAD_FOLDERS[case](tmp_path)
    before = tree_digest(folder)
    assert_one_error_line(cli("cache-info", str(folder)), *BAD_NAMES[case])
    assert tree_digest(folder) == before


def test_cache_info_cli_on_mixed_indexes(tmp_path: Path) -> None:
    folder = mixed_index_folder(tmp_path)
    before = tree_digest(folder)
    assert_one_error_line(cli("cache-info", str(folder)), str(folder), "schema-2 and schema-3", "--writer.schema")
    assert tree_digest(folder) == before


def fit_args(cache: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit", "--seed_everything", "3", "--model.student.preset", "tiny",
        "--model.loss", "pd_lightning.distill.losses.KLD",
        "--data.class_path", "pd_lightning.cache.datamodule.CacheDataModule",
        "--data.init_args.path", str(cache), "--data.init_args.batch_size", "2",
        "--data.init_args.shuffle", "false",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "3",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
        "--trainer.logger", "false", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("case", ["frame-byte", "unknown-schema", "mixed-shards"])
def test_fit_cli_on_bad_schema3_input(tmp_path: Path, case: str) -> None:
    """`pd-lightning fit` reading the cache: one line naming the shard, exit 2, no checkpoint (the corrupt block
    is read in a DataLoader worker: the error still reaches the user as one line)."""
    folder = BAD_FOLDERS[case](tmp_path)
    before = tree_digest(folder)
    run = cli(*fit_args(folder, tmp_path / "run", "--data.init_args.num_workers", "1"))
    assert_one_error_line(run, *BAD_NAMES[case])
    assert tree_digest(folder) == before and not list((tmp_path / "run").rglob("*.ckpt"))


# --------------------------------------------------------------------------------------------- writer refusals
def test_writer_refuses_the_other_schema_and_overwrite_replaces(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    small_cache(folder, schema=3)
    before = tree_digest(folder)
    spec = TeacherCache(folder).spec
    with pytest.raises(
        CacheMismatchError, match=r"holds a schema-3 cache of this teacher.*writes schema 2.*--writer\.schema 3"
    ):
        CacheWriter(folder, spec, schema=2)
    assert tree_digest(folder) == before
    same = CacheWriter(folder, spec, schema=3)  # the same schema: complete, nothing to do
    assert same.complete and same.finalize() == folder / "index.json" and tree_digest(folder) == before
    # an interrupted run (rank 0 of 2 finished its shards) is refused the same way, in both directions
    part = tmp_path / "part"
    small_cache(part, schema=2, world=2, ranks=[0])
    part_before = tree_digest(part)
    with pytest.raises(CacheMismatchError, match=r"holds a schema-2 cache.*--writer\.schema 2"):
        CacheWriter(part, spec, rank=1, world_size=2, schema=3)
    assert tree_digest(part) == part_before
    with pytest.raises(ValueError, match=r"--writer\.schema must be one of \[2, 3\], got 4"):
        CacheWriter(tmp_path / "new", spec, schema=4)
    # --writer.overwrite true: the other schema's cache is replaced by a readable one of this schema
    replaced = CacheWriter(folder, spec, schema=2, overwrite=True)
    assert not replaced.complete and not list(folder.glob("shard-*"))
    replaced.close()
    small_cache(folder, schema=2)
    small_cache(tmp_path / "fresh2", schema=2)
    assert TeacherCache(folder).layout.schema == 2
    assert content_checksum(folder) == content_checksum(tmp_path / "fresh2")
    c2, c3 = TeacherCache(folder), TeacherCache(tmp_path / "fresh2")
    for i in range(6):
        assert_same_reads(c2, c3, i)
