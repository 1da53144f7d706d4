"""Bytes per cached entry and decode speed: the entry codec (``pd_lightning/cache/codec.py``, "v3") against
schema 2 (``id << 14 | q`` in a uint32, "v2") and a Megatron-like coding (fp16 log p + bit-packed ids, zstd), on
the same real teacher entries.

This is the exploration that chose schema 3's coding: the codec at its own default step (1.99e-3) on
2,048-position blocks. The cache itself codes the schema-2 codes (step ``nlogp_max / 16383`` = 8.4e-4) in blocks
of at most 2,048 positions of one sequence; ``benchmarks/cache_size.py`` measures that through the real writer and
reader.

Inputs (real data, not synthetic):

- a schema-2 cache written by ``pd-lightning predict`` (``--cache``): its entries, already quantised to 8.4e-4;
- fp32 log-probs of the same teacher (``--fp32``, an ``.npz`` of counts / ids / nlogp; made from ``--teacher``
  and ``--tokens`` with the top-0.95-100 processor when missing): the max |Δ log p| of v3 is measured on these.

Both are coded at the teacher's vocabulary and at 151,552 (ids mapped through
``np.random.default_rng(0).permutation(151552)``). Blocks of ``--block`` positions (2048: a reader's window), one
id table per shard built from the shard's first block (what a streaming writer knows), its bytes counted.

Speeds, one thread, medians of ``--reps`` interleaved repetitions (each decodes every block once), with the
spread: ``flat`` = block bytes in memory -> ``(E,)`` int64 ids + fp32 values; ``padded`` = the reader's output
``(W, K)`` int64 ids (padding 0) + fp32 log p (padding -inf), v2 through ``cache_format.decode`` itself;
``zstd only`` = v3's decompression alone (its CPU share if the integer assembly ran on the GPU). Last line:
``RESULT v3_bytes_per_entry_151k=... v3_max_abs_err=... v2_bytes_per_entry_151k=... megatron_bytes_per_entry_151k=...
v3_decode_tokens_per_s=... v2_decode_tokens_per_s=...`` (decode = padded, the reader's level) plus the flat figures.

Run (after ``make demo`` and ``benchmarks/cache_size.py``, whose outputs are the defaults):
``.venv/bin/python benchmarks/entry_codec_size.py [--alternatives]``
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import statistics
import time
from pathlib import Path

import h5py
import numpy as np
import zstandard

from pd_lightning.cache import codec as ec
from pd_lightning.cache.format import Q_BITS, Q_MAX, decode

BIG_VOCAB = 151_552


def read_schema2(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int, int]:
    """counts, packed entries, ids of every shard of a schema-2 cache; its nlogp_max, vocab, K."""
    counts, entries = [], []
    for f in sorted(glob.glob(str(path / "shard-*.h5"))):
        with h5py.File(f) as h:
            counts.append(h["counts"][:].astype(np.int64))
            entries.append(h["entries"][:])
            nlogp_max, vocab, k = float(h.attrs["nlogp_max"]), int(h.attrs["vocab_size"]), int(h.attrs["max_entries"])
    e = np.concatenate(entries)
    return np.concatenate(counts), e, (e >> Q_BITS).astype(np.int64), nlogp_max, vocab, k


def teacher_entries(ckpt: str, tokens: str, split: str, sequences: int, out: Path) -> None:
    """fp32 top-0.95-100 entries of a teacher over ``sequences`` rows of a token file -> ``out`` (.npz)."""
    import torch

    from pd_lightning.distill.processors import TopPK
    from pd_lightning.teacher import load_teacher

    teacher = load_teacher(ckpt)
    with h5py.File(tokens) as f:
        rows = f[split][:sequences]
    proc, parts = TopPK(0.95, 100), []
    with torch.no_grad():
        for s in range(0, len(rows), 8):
            target = proc(teacher(torch.from_numpy(rows[s : s + 8, :-1].astype(np.int64))))
            valid = torch.isfinite(target.logprobs)
            parts.append((valid.sum(-1).numpy(), target.ids[valid].numpy(), (-target.logprobs[valid]).numpy()))
    np.savez(
        out,
        counts=np.concatenate([p[0] for p in parts]),
        ids=np.concatenate([p[1] for p in parts]),
        nlogp=np.concatenate([p[2] for p in parts]).astype(np.float32),
        vocab_size=teacher.vocab_size,
    )


def blocks_of(counts: np.ndarray, block: int) -> list[tuple[int, int, int, int]]:
    """(first position, end position, first entry, end entry) of each block."""
    cs = np.concatenate([[0], np.cumsum(counts)])
    ends = [min(s + block, len(counts)) for s in range(0, len(counts), block)]
    return [(s, t, int(cs[s]), int(cs[t])) for s, t in zip(range(0, len(counts), block), ends)]


def encode_v3(counts, ids, nlogp, vocab, bounds, step=ec.DEFAULT_STEP):
    table = ec.build_id_table(ids[: bounds[0][3]], vocab)  # the shard's first block
    blocks = [ec.encode_block(counts[a:b], ids[x:y], nlogp[x:y], table, step=step) for a, b, x, y in bounds]
    return table, blocks


def megatron_like(counts, ids, nlogp, vocab, bounds) -> tuple[int, float]:
    """fp16 log p + ids bit-packed at ceil(log2 V) bits, zstd (level 3) per block: bytes, max |Δ log p|."""
    bits = max(1, math.ceil(math.log2(vocab)))
    comp = zstandard.ZstdCompressor(level=3)
    total = 0
    for _, _, x, y in bounds:
        lp16 = (-nlogp[x:y]).astype(np.float16)
        idbits = np.unpackbits(ids[x:y].astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)[:, 32 - bits :]
        total += len(comp.compress(lp16.tobytes() + np.packbits(idbits.reshape(-1)).tobytes()))
    err = float(np.abs((-nlogp).astype(np.float16).astype(np.float64) + nlogp.astype(np.float64)).max())
    return total, err


def pad(counts: np.ndarray, ids: np.ndarray, nlogp: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat entries -> the reader's ``(W, K)`` arrays, exactly as ``cache_format.decode`` pads."""
    w = counts.shape[0]
    lp = -nlogp
    if ids.shape[0] == w * k:
        return ids.reshape(w, k), lp.reshape(w, k)
    out_ids = np.zeros((w, k), dtype=np.int64)
    out_lp = np.full((w, k), -np.inf, dtype=np.float32)
    mask = np.arange(k)[None, :] < np.arange(k + 1)[:, None]
    mask = np.take(mask, counts, axis=0)
    out_ids[mask] = ids
    out_lp[mask] = lp
    return out_ids, out_lp


def alternatives(counts, ids, nlogp, vocab, bounds) -> None:
    """Sizes (bits/entry, zstd per block) of the codings compared before choosing v3's."""

    def z(arrays, level=1):
        c = zstandard.ZstdCompressor(level=level)
        return sum(len(c.compress(np.ascontiguousarray(a).tobytes())) for a in arrays)

    def per_block(x, fn):
        return [fn(x[a:b]) for _, _, a, b in bounds]

    e = len(ids)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[counts > 0]
    for step in (math.log(1e6) / Q_MAX, 1.6e-3, ec.DEFAULT_STEP):  # schema 2's step, then coarser
        q = np.rint(nlogp.astype(np.float64) / step).astype(np.int64)
        d = np.diff(q, prepend=0).astype(np.uint16)
        for level in (1, 3, 9):
            n = sum(z([b.view(np.uint8)[0::2], b.view(np.uint8)[1::2]], level) for b in per_block(d, lambda x: x))
            print(
                f"  values step {step:.2e} (err {step / 2:.1e}): deltas, 2 planes, zstd {level}: {8 * n / e:.2f} bits"
            )
        n = sum(z([b], 1) for b in per_block(d, lambda x: x))
        print(f"  values step {step:.2e}: wrapped deltas as uint16 (no planes), zstd 1: {8 * n / e:.2f} bits")
    q = np.rint(nlogp.astype(np.float64) / ec.DEFAULT_STEP).astype(np.int64)
    first = np.zeros(e, bool)
    first[starts] = True
    d = np.diff(q, prepend=0)
    d[first] = q[first]
    _, cnt = np.unique(d[~first], return_counts=True)
    p = cnt / cnt.sum()
    print(f"  values: order-0 entropy of in-row deltas {-(p * np.log2(p)).sum():.2f} bits (+ row starts)")
    slot = np.arange(e) - np.repeat(np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    dd = np.diff(q, prepend=0).astype(np.uint16)
    n = 0
    for _, _, a, b in bounds:
        o = np.argsort(slot[a:b], kind="stable")
        x = dd[a:b][o]
        n += z([x.view(np.uint8)[0::2], x.view(np.uint8)[1::2]])
    print(f"  values: slot-major order (first entries, then second ...), zstd 1: {8 * n / e:.2f} bits (+ a gather)")
    table = ec.build_id_table(ids[: bounds[0][3]], vocab)
    r = table.ranks(ids).astype(np.int64)
    _, cnt = np.unique(r, return_counts=True)
    p = cnt / cnt.sum()
    print(f"  ids: order-0 entropy {-(p * np.log2(p)).sum():.2f} bits; raw {math.ceil(math.log2(vocab))} bits")
    raw = ids.astype(np.uint32)
    nb = (int(raw.max()).bit_length() + 7) // 8
    n = sum(z([x.view(np.uint8)[k::4] for k in range(nb)]) for x in per_block(raw, lambda x: x))
    print(f"  ids: raw id byte planes, zstd 1: {8 * n / e:.2f} bits")
    for lo_bits in (8, 7, 6, 5, 4):
        n = 0
        for x in per_block(r, lambda x: x):
            planes = [x & ((1 << lo_bits) - 1)] + [(x >> (lo_bits + 8 * j)) & 255 for j in range(3)]
            n += z([pl.astype(np.uint8) for pl in planes])
        print(f"  ids: frequency ranks, low {lo_bits} bits + byte planes above, zstd 1: {8 * n / e:.2f} bits")
    esc = r >= 240
    a = np.where(esc, 240 + ((r - 240) >> 8), r)
    n = sum(z([x.astype(np.uint8)]) for x in per_block(a, lambda x: x)) + z([((r - 240) & 255)[esc].astype(np.uint8)])
    print(f"  ids: ranks < 240 in one byte, else escape + a 2nd byte: {8 * n / e:.2f} bits ({esc.mean():.0%} escapes)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Defaults: the demo's artefacts (`make demo`) and the held-out cache benchmarks/cache_size.py writes.
    ap.add_argument("--cache", default="data/bench/cache-val-top-0.95-100-schema2", help="a schema-2 cache (predict)")
    ap.add_argument("--fp32", default="data/bench/fp32-val.npz", help="fp32 entries (.npz); made when missing")
    ap.add_argument("--teacher", default="runs/demo/teacher/teacher.ckpt")
    ap.add_argument("--tokens", default="data/demo/tokens.h5")
    ap.add_argument("--split", default="val")
    ap.add_argument("--sequences", type=int, default=512)
    ap.add_argument("--block", type=int, default=2048, help="positions per block (a reader's window)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--alternatives", action="store_true", help="also print the sizes of the codings compared")
    args = ap.parse_args()
    for flag, path in (("--cache", args.cache), ("--teacher", args.teacher), ("--tokens", args.tokens)):
        if not Path(path).exists():
            raise SystemExit(f"entry_codec_size: {flag} {path} does not exist (make demo, then "
                             "benchmarks/cache_size.py, writes the defaults)")  # fmt: skip

    fp32 = Path(args.fp32)
    if not fp32.exists():
        print(f"computing fp32 teacher entries -> {fp32}")
        teacher_entries(args.teacher, args.tokens, args.split, args.sequences, fp32)
    npz = np.load(fp32)
    f_counts, f_ids, f_nlogp = npz["counts"].astype(np.int64), npz["ids"].astype(np.int64), npz["nlogp"]
    vocab = int(npz["vocab_size"])
    s_counts, s_entries, s_ids, nlogp_max, s_vocab, k = read_schema2(Path(args.cache))
    s_nlogp = (s_entries & Q_MAX).astype(np.float64) * (nlogp_max / Q_MAX)  # the cache's (quantised) values
    assert s_vocab == vocab
    perm = np.random.default_rng(0).permutation(BIG_VOCAB)
    print(f"threads: 1 (numpy element-wise ops and zstd run on the calling thread); pid {os.getpid()}")
    print(
        f"fp32 entries: {len(f_counts):,} positions, {len(f_ids):,} entries ({len(f_ids) / len(f_counts):.1f}/position)"
    )
    print(
        f"schema-2 cache {args.cache}: {len(s_counts):,} positions, {len(s_ids):,} entries; K={k}; block {args.block}"
    )
    if args.alternatives:
        print(f"alternatives on the fp32 entries at V = {vocab} (table from the first block):")
        alternatives(f_counts, f_ids, f_nlogp, vocab, blocks_of(f_counts, args.block))

    res = {}
    for tag, v, idmap in (("4096", vocab, None), ("151k", BIG_VOCAB, perm)):
        for src, counts, ids, nlogp in (("fp32", f_counts, f_ids, f_nlogp), ("cache", s_counts, s_ids, s_nlogp)):
            ids_v = ids if idmap is None else idmap[ids]
            bounds = blocks_of(counts, args.block)
            table, blocks = encode_v3(counts, ids_v, nlogp, v, bounds)
            nbytes = sum(len(b) for b in blocks) + len(table.to_bytes())
            dec = [ec.decode_block(b, counts[a:c], table) for b, (a, c, _, _) in zip(blocks, bounds)]
            out_ids = np.concatenate([d[0] for d in dec])
            out_nlogp = np.concatenate([d[1] for d in dec]).astype(np.float64)
            assert (out_ids == ids_v).all(), "ids not exact"
            err = float(np.abs(out_nlogp - nlogp.astype(np.float64)).max())
            mbytes, merr = megatron_like(counts, ids_v, nlogp, v, bounds)
            q2 = np.rint(np.clip(nlogp, 0, nlogp_max) * (Q_MAX / nlogp_max))
            v2_err = float(np.abs(q2.astype(np.float32) * np.float32(nlogp_max / Q_MAX) - nlogp).max())
            v2_bpe = 4.0 if v <= 1 << 18 else 8.0
            e = len(ids_v)
            print(
                f"V={v:>7} {src:5}: v3 {nbytes / e:.4f} B/entry (table {len(table.to_bytes()):,} B)"
                f" max|Δ| {err:.2e}; v2 {v2_bpe:.4f} max|Δ| {v2_err:.2e};"
                f" megatron-like {mbytes / e:.4f} max|Δ| {merr:.2e}"
            )
            res[(tag, src)] = dict(v3=nbytes / e, err=err, v2=v2_bpe, meg=mbytes / e, merr=merr)

    # synthetic ids spanning the whole 151k vocabulary (the permuted demo ids use only 4,096 ranks): density ~ 1/rank
    rng = np.random.default_rng(1)
    ranks = np.floor(np.exp(rng.random(len(f_ids)) * math.log(BIG_VOCAB))).astype(np.int64) - 1
    zipf_ids = perm[ranks]
    bounds = blocks_of(f_counts, args.block)
    table, blocks = encode_v3(f_counts, zipf_ids, f_nlogp, BIG_VOCAB, bounds)
    _, cnt = np.unique(ranks, return_counts=True)
    p = cnt / cnt.sum()
    size = (sum(map(len, blocks)) + len(table.to_bytes())) / len(f_ids)
    print(
        f"synthetic ids ~ 1/rank over all 151,552 (real values): v3 {size:.4f} B/entry; the ids' order-0 entropy"
        f" alone is {-(p * np.log2(p)).sum() / 8:.3f} B"
    )

    # speeds on the fp32 entries at 151k (one table, blocks of args.block positions)
    counts, ids_v, nlogp = f_counts, perm[f_ids], f_nlogp
    bounds = blocks_of(counts, args.block)
    t0 = time.perf_counter()
    table, blocks = encode_v3(counts, ids_v, nlogp, BIG_VOCAB, bounds)
    q2 = np.rint(np.clip(nlogp, 0, nlogp_max) * (Q_MAX / nlogp_max)).astype(np.int64)
    packed = ((f_ids << Q_BITS) | q2).astype(np.uint32)  # schema 2's entries (demo ids: < 2^18 either way)
    scale = np.float32(-nlogp_max / Q_MAX)
    cnt = [counts[a:b] for a, b, _, _ in bounds]
    ent = [packed[x:y] for _, _, x, y in bounds]
    frames = []
    for b in blocks:
        h = ec.read_header(b)
        off, fr = h.header_size, []
        for n in h.frame_lengths:
            fr.append(b[off : off + n])
            off += n
        frames.append(fr)
    dz = zstandard.ZstdDecompressor()

    def v3_flat():
        for b, c in zip(blocks, cnt):
            ec.decode_block(b, c, table)

    def v2_flat():
        for e in ent:
            (e >> Q_BITS).astype(np.int64), (e & Q_MAX).astype(np.float32) * scale

    def v3_padded():
        for b, c in zip(blocks, cnt):
            i, n = ec.decode_block(b, c, table)
            pad(c, i, n, k)

    def v2_padded():
        for e, c in zip(ent, cnt):
            decode(c, e, k, nlogp_max)

    def v3_zstd():
        for fr in frames:
            for f in fr:
                dz.decompress(f)

    def v3_encode():
        encode_v3(counts, ids_v, nlogp, BIG_VOCAB, bounds)

    fns = {"v3 flat": v3_flat, "v2 flat": v2_flat, "v3 padded": v3_padded, "v2 padded": v2_padded,
           "v3 zstd only": v3_zstd, "v3 encode": v3_encode}  # fmt: skip
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    positions, entries = len(counts), len(ids_v)
    print(f"speeds at V=151,552 ({entries / positions:.1f} entries/position), median of {args.reps} interleaved reps:")
    rate = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        rate[name] = positions / med
        print(
            f"  {name:13} {positions / med / 1e6:6.2f}M tokens/s  {entries / med / 1e6:7.1f}M entries/s  "
            f"[min-max {positions / max(ts) / 1e6:.2f}-{positions / min(ts) / 1e6:.2f}M tokens/s]"
        )
    ratio = [a / b for a, b in zip(times["v2 padded"], times["v3 padded"])]
    ratio_flat = [a / b for a, b in zip(times["v2 flat"], times["v3 flat"])]
    print(
        f"  v3 / v2 decode speed, paired per rep: padded {statistics.median(ratio):.3f} [{min(ratio):.3f}, "
        f"{max(ratio):.3f}], flat {statistics.median(ratio_flat):.3f} [{min(ratio_flat):.3f}, {max(ratio_flat):.3f}]"
    )
    big = res[("151k", "fp32")]
    print(
        f"RESULT v3_bytes_per_entry_151k={big['v3']:.4f} v3_max_abs_err={max(r['err'] for r in res.values()):.3e} "
        f"v2_bytes_per_entry_151k={big['v2']:.4f} megatron_bytes_per_entry_151k={big['meg']:.4f} "
        f"v3_decode_tokens_per_s={rate['v3 padded']:.0f} v2_decode_tokens_per_s={rate['v2 padded']:.0f} "
        f"v3_flat_decode_tokens_per_s={rate['v3 flat']:.0f} v2_flat_decode_tokens_per_s={rate['v2 flat']:.0f} "
        f"v3_encode_tokens_per_s={rate['v3 encode']:.0f} v3_bytes_per_entry_4096={res[('4096', 'fp32')]['v3']:.4f} "
        f"decode_ratio_padded={statistics.median(ratio):.3f} threads=1"
    )


if __name__ == "__main__":
    main()
