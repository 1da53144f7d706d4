"""Teacher-cache read throughput per DataLoader worker: HDF5 shards vs the same bytes in numpy memmaps.

Builds a synthetic cache (vocabulary 151,552, seq_len 2048 by default, K=100) with the real writer, then times,
in one process and with a warm page cache, reading 2048-position windows at random sequences and offsets with
``TeacherCache.read``: HDF5 reads, fletcher32 checks, decoding to ``(L, K)`` int64 ids and fp32 log-probs with
-inf padding, torch tensors. The baseline reads the same arrays from ``.npy`` memmaps and runs the same
decoding. Two entry distributions: ``mixed`` (entries per token drawn like a top-0.95-100 cache: 40% of the
tokens confident with 1-3 entries, a long tail, 14% at the cap; mean ~28) and ``full`` (all 100). The same
mixed data is also written as many small shards (``--many-shards``, 32 by default) and read in the same
interleaved repetitions, so a cache of many bounded shards can be compared with one big shard. Reports the
median over repetitions (and the spread of the paired ratios); the last line is ``RESULT cache_tokens_per_s=...
memmap_tokens_per_s=... ratio=... many_shards_tokens_per_s=... many_shards_ratio=...`` for the mixed case
(``many_shards_ratio`` = many shards ÷ one shard).

Run: ``.venv/bin/python benchmarks/loader_throughput.py [--sequences 512] [--reps 7] [--profile]``
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from pd_lightning.cache import CacheSpec, CacheWriter, TeacherCache
from pd_lightning.cache.format import DATASETS, decode
from pd_lightning.distill.processors import TopPK
from pd_lightning.distill.target import SparseTarget

VOCAB, WINDOW, K = 151_552, 2048, 100


def synthetic_counts(rng: np.random.Generator, n: int, mode: str) -> np.ndarray:
    """Entries per position: ``full`` = K everywhere; ``mixed`` = a top-0.95-100-like mix."""
    if mode == "full":
        return np.full(n, K)
    kind = rng.random(n)
    counts = np.where(kind < 0.35, rng.integers(1, 4, n), np.minimum(rng.geometric(1 / 30, n), K))
    return np.where(kind > 0.88, K, counts)


def zipf_ids(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Ids with a teacher-like frequency skew: density ~ 1/rank over the whole vocabulary, ranks mapped to ids by a
    fixed permutation (no id locality)."""
    ranks = np.floor(np.exp(rng.random(shape) * np.log(VOCAB))).astype(np.int64) - 1
    return _PERM[ranks]


_PERM = np.random.default_rng(12345).permutation(VOCAB)


def build(
    folder: Path,
    mode: str,
    sequences: int,
    seq_len: int,
    chunk_entries: int,
    seed: int = 0,
    shards: int = 1,
    schema: int = 2,
) -> Path:
    """Write a synthetic cache with the real writer (``shards`` shards, ``schema``) and return its folder."""
    rng = np.random.default_rng(seed)
    spec = CacheSpec.for_processor(
        TopPK(0.95, K),
        vocab_size=VOCAB,
        seq_len=seq_len,
        num_sequences=sequences,
        teacher_fingerprint="synthetic",
        tokenizer_fingerprint="synthetic",
        source_fingerprint=f"synthetic-{mode}",
        shard_tokens=-(-sequences // shards) * seq_len,
    )
    writer = CacheWriter(folder, spec, chunk_entries=chunk_entries, schema=schema)
    for i in range(sequences):
        counts = torch.from_numpy(synthetic_counts(rng, seq_len, mode))
        valid = torch.arange(K)[None, :] < counts[:, None]  # (L, K)
        ids = torch.from_numpy(zipf_ids(rng, (seq_len, K)))
        logprobs = -torch.from_numpy(rng.exponential(3.0, (seq_len, K))).float().cumsum(-1) / 10
        target = SparseTarget(
            ids=ids.masked_fill(~valid, 0),
            logprobs=logprobs.masked_fill(~valid, -float("inf")),
            std=torch.from_numpy(rng.random(seq_len)).float() * 3,
            entropy=torch.from_numpy(rng.random(seq_len)).float() * 5,
        )
        writer.write(torch.tensor([i]), torch.from_numpy(rng.integers(0, VOCAB, (1, seq_len + 1))), target)
    writer.finalize()
    return folder


class MemmapCache:
    """The same arrays as the shard, as ``.npy`` memmaps, read and decoded exactly like ``TeacherCache.read``."""

    def __init__(self, shard: Path, folder: Path, seq_len: int) -> None:
        self.seq_len = seq_len
        folder.mkdir(exist_ok=True)
        with h5py.File(shard, "r") as f:
            for name in DATASETS:
                np.save(folder / f"{name}.npy", f[name][:])
        self.a = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in DATASETS}

    def read(self, r: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        a, base = self.a, r * self.seq_len
        tokens = a["tokens"][r, start : stop + 1]
        counts = a["counts"][base : base + stop]
        first = int(a["sequence_offsets"][r]) + int(counts[:start].sum(dtype=np.int64))
        counts = counts[start:]
        entries = a["entries"][first : first + int(counts.sum(dtype=np.int64))]
        stats = {name: a[name][base + start : base + stop] for name in ("std", "entropy", "tail")}
        for value in stats.values():  # the reader's finiteness check
            if not np.isfinite(value).all():
                raise ValueError("non-finite statistic")
        ids, logprobs = decode(counts, entries, K)
        tokens = torch.from_numpy(tokens.astype(np.int64))
        return {
            "input_ids": tokens[:-1],
            "labels": tokens[1:].clone(),
            "teacher_ids": torch.from_numpy(ids),
            "teacher_logprobs": torch.from_numpy(logprobs),
            "teacher_std": torch.from_numpy(stats["std"].astype(np.float32)),
            "teacher_entropy": torch.from_numpy(stats["entropy"].astype(np.float32)),
            "teacher_tail": torch.from_numpy(stats["tail"].astype(np.float32)),
        }


def tokens_per_s(read, windows: np.ndarray) -> float:
    """Read ``windows`` ``(n, 2)`` of (sequence, start) pairs, WINDOW positions each."""
    start = time.perf_counter()
    for i, a in windows.tolist():
        read(i, a, a + WINDOW)
    return len(windows) * WINDOW / (time.perf_counter() - start)


def random_windows(rng: np.random.Generator, sequences: int, seq_len: int, n: int) -> np.ndarray:
    return np.stack([rng.integers(0, sequences, n), rng.integers(0, seq_len - WINDOW + 1, n)], axis=1)


def run(args: argparse.Namespace, mode: str, tmp: Path) -> tuple[float, float, float]:
    sequences, reps, windows, seq_len = args.sequences, args.reps, args.windows, args.seq_len
    folder = build(tmp / mode, mode, sequences, seq_len, args.chunk_entries)
    cache = TeacherCache(folder)
    v3 = TeacherCache(build(tmp / f"{mode}-v3", mode, sequences, seq_len, args.chunk_entries, schema=3))
    memmap = MemmapCache(cache.files[0], tmp / f"{mode}-npy", seq_len)
    many = None
    if mode == "mixed":  # the same data (same seed) in many shards
        many = TeacherCache(build(tmp / "many", mode, sequences, seq_len, args.chunk_entries, shards=args.many_shards))
    for i in range(sequences):  # warm the page cache (and the file handles); the two schemas read the same values
        a, b = cache.read(i), v3.read(i)
        assert all(torch.equal(a[key], b[key]) for key in a), f"schema 2 and 3 differ at sequence {i}"
        memmap.read(i, 0, seq_len)
        if many is not None:
            many.read(i)
    rng = np.random.default_rng(1)
    results = {"cache": [], "v3": [], "memmap": [], "many": []}
    for r in range(reps):
        order = random_windows(rng, sequences, seq_len, windows)
        arms = [("cache", cache.read), ("v3", v3.read), ("memmap", memmap.read)]
        arms += [("many", many.read)] if many is not None else []
        for name, read in arms[r % len(arms) :] + arms[: r % len(arms)]:  # rotated order
            results[name].append(tokens_per_s(read, order))
    if args.profile:
        for name, reader in (("schema 2", cache), ("schema 3", v3)):
            print(f"profile, {name}:")
            prof = cProfile.Profile()
            prof.runcall(tokens_per_s, reader.read, random_windows(rng, sequences, seq_len, windows))
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    c, m = statistics.median(results["cache"]), statistics.median(results["memmap"])
    c3 = statistics.median(results["v3"])
    size = sum(f.stat().st_size for f in cache.files)
    size3 = sum(f.stat().st_size for f in v3.files)
    print(
        f"{mode:>5}: {sequences * seq_len / 1e6:.2f}M tokens, {size / 1e6:.0f} MB "
        f"({size / (sequences * seq_len):.1f} B/token); cache {c / 1e6:.2f}M tok/s, memmap {m / 1e6:.2f}M tok/s, "
        f"ratio {c / m:.2f}  (median of {reps} x {windows} windows)"
    )
    paired3 = [a / b for a, b in zip(results["v3"], results["cache"])]
    print(
        f"{mode:>5}: schema 3 {size3 / 1e6:.0f} MB ({size3 / (sequences * seq_len):.1f} B/token) "
        f"{c3 / 1e6:.2f}M tok/s; schema 3 ÷ schema 2: median {statistics.median(paired3):.3f} "
        f"(min {min(paired3):.3f}, max {max(paired3):.3f})"
    )
    n = 0.0
    if many is not None:
        n = statistics.median(results["many"])
        paired = [a / b for a, b in zip(results["many"], results["cache"])]
        print(
            f"{mode:>5}: {len(many.files)} shards {n / 1e6:.2f}M tok/s; many ÷ one shard: median "
            f"{statistics.median(paired):.3f} (min {min(paired):.3f}, max {max(paired):.3f})"
        )
    return c, m, n, c3, statistics.median(paired3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=512, help="sequences per synthetic cache")
    parser.add_argument("--seq-len", type=int, default=WINDOW, help="cached sequence length (>= 2048)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (the median is reported)")
    parser.add_argument("--windows", type=int, default=200, help="random windows per repetition")
    parser.add_argument("--chunk-entries", type=int, default=CacheWriter.__init__.__kwdefaults__["chunk_entries"])
    parser.add_argument("--many-shards", type=int, default=32, help="shards of the many-shard copy of the mixed cache")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the cache reads")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker = one core
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        full = run(args, "full", Path(tmp))
        mixed = run(args, "mixed", Path(tmp))
    print(
        f"full k=100: cache_tokens_per_s={full[0]:.0f} memmap_tokens_per_s={full[1]:.0f} "
        f"v3_cache_tokens_per_s={full[3]:.0f} v3_ratio={full[4]:.3f}"
    )
    print(
        f"RESULT cache_tokens_per_s={mixed[0]:.0f} memmap_tokens_per_s={mixed[1]:.0f} ratio={mixed[0] / mixed[1]:.3f} "
        f"many_shards_tokens_per_s={mixed[2]:.0f} many_shards_ratio={mixed[2] / mixed[0]:.3f} "
        f"v3_cache_tokens_per_s={mixed[3]:.0f} v3_ratio={mixed[4]:.3f} full_v3_cache_tokens_per_s={full[3]:.0f} "
        f"full_v3_ratio={full[4]:.3f}"
    )


if __name__ == "__main__":
    main()
