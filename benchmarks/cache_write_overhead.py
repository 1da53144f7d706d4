"""Overhead of caching a teacher's logits: time of (teacher forward + TopPK processing + background HDF5 writing,
finalisation included) ÷ time of the teacher forward alone, over the same tokens, in one run.

    .venv/bin/python benchmarks/cache_write_overhead.py [--hidden 512 --layers 4 --vocab 4096 --sequences 24]

The teacher is a Llama-layout transformer (random weights: the cost of top-p-k does not depend on them) sized so
that its forward pass dominates as a real teacher's does (params >> vocab). Repetitions alternate the two
variants; the ratio is the median of paired ratios. Last line:
``RESULT write_overhead_ratio=... forward_s=... forward_process_write_s=... process_only_ratio=...``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pd_lightning.data.cache_format import CacheSpec
from pd_lightning.data.cache_writer import BackgroundWriter, CacheWriter
from pd_lightning.distill.processors import TopPK, position_keys
from pd_lightning.model.config import StudentConfig
from pd_lightning.model.transformer import Transformer


def run(teacher, batches, processor=None, out: Path | None = None, spec: CacheSpec | None = None) -> float:
    writer = BackgroundWriter(CacheWriter(out, spec, overwrite=True)) if out is not None else None
    t0 = time.perf_counter()
    with torch.no_grad():
        for index, tokens in batches:
            logits = teacher(tokens[:, :-1])  # (B, L, V)
            if processor is not None:
                target = processor(logits, position_keys(index, tokens.shape[1] - 1))
                if writer is not None:
                    writer.write(index, tokens, target)
    if writer is not None:
        writer.finalize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=24)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = StudentConfig(
        vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.hidden // 64,
        n_query_groups=max(1, args.hidden // 256), intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
    )  # fmt: skip
    teacher = Transformer(cfg).eval()
    tokens = torch.randint(0, args.vocab, (args.sequences, args.seq + 1))
    batches = [(torch.arange(i, min(i + args.batch, args.sequences)), tokens[i : i + args.batch])
               for i in range(0, args.sequences, args.batch)]  # fmt: skip
    processor = TopPK(0.95, 100)
    spec = CacheSpec.for_processor(
        processor, vocab_size=args.vocab, seq_len=args.seq, num_sequences=args.sequences,
        teacher_fingerprint="bench", tokenizer_fingerprint="bench", source_fingerprint="bench",
    )  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="pd-bench-"))
    try:
        run(teacher, batches[:1])  # warm-up
        fwd, full, proc, ratios = [], [], [], []
        for r in range(args.reps):
            a = run(teacher, batches)
            b = run(teacher, batches, processor, tmp / f"cache{r}", spec)
            c = run(teacher, batches, processor)
            fwd.append(a)
            full.append(b)
            proc.append(c / a)
            ratios.append(b / a)
        size = sum(f.stat().st_size for f in (tmp / "cache0").iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tokens_n = args.sequences * args.seq
    print(
        f"teacher {cfg.num_parameters() / 1e6:.1f}M params, vocab {args.vocab}, {tokens_n} tokens, "
        f"cache {size / 1e6:.1f} MB"
    )
    print(
        f"forward only           median {statistics.median(fwd):.2f} s  "
        f"({tokens_n / statistics.median(fwd):,.0f} tok/s)"
    )
    print(
        f"forward+process+write  median {statistics.median(full):.2f} s  paired ratios {[round(x, 3) for x in ratios]}"
    )
    print(f"forward+process        paired ratios {[round(x, 3) for x in proc]}")
    print(
        f"RESULT write_overhead_ratio={statistics.median(ratios):.4f} forward_s={statistics.median(fwd):.3f} "
        f"forward_process_write_s={statistics.median(full):.3f} process_only_ratio={statistics.median(proc):.4f}"
    )


if __name__ == "__main__":
    main()
