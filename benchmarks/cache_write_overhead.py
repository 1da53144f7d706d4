"""Overhead of caching a teacher's logits, and what writing the cache costs in disk traffic and disk space.

    .venv/bin/python benchmarks/cache_write_overhead.py [--reps 7] [--sequences 24]

Time: (teacher forward + TopPK processing with the stored statistics + background HDF5 writing, finalisation
included) ÷ the teacher forward alone, over the same tokens, in one run, at two teacher shapes:

- ``small`` (today's): Llama-layout, hidden 512, 4 layers, vocab 4,096 (~3.7k parameters per vocabulary entry);
- ``realistic``: the parameters per vocabulary entry of a real teacher/tokenizer pair (GLM-4-9B: 9.4e9 / 151,552
  ≈ 62k) scaled down to what a CPU runs: hidden 640, 7 layers, vocab 480 (~63k per entry). The cost of top-p-k
  and of writing grows with the vocabulary, the forward with the parameters, so this ratio is what it would be on
  a real teacher.

Disk (write-once cache, measured on the small shape's write runs): ``bytes_written_ratio`` = bytes the process
passed to write(2) during the run (``/proc/self/io`` ``wchar``) ÷ the final cache size; ``peak_disk_ratio`` = the
largest total size of the cache folder seen during an extra, untimed write run (sampled every 2 ms) ÷ the final
size.

CPU-time ratios (``time.process_time``, all threads) are printed too: on this shared machine they are far less
sensitive to other processes than wall time, and they count the writer thread's work, which on a GPU machine runs on
an otherwise idle host core. Random weights (the cost does not depend on them). Repetitions alternate the variants;
ratios are medians of paired ratios, with their min/max. Last line: ``RESULT write_overhead_ratio=... forward_s=...
forward_process_write_s=... process_only_ratio=... bytes_written_ratio=... peak_disk_ratio=...
realistic_write_ratio=... realistic_write_cpu_ratio=...``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from pd_lightning.data.cache_format import CacheSpec
from pd_lightning.data.cache_writer import BackgroundWriter, CacheWriter
from pd_lightning.distill.processors import TopPK, position_keys
from pd_lightning.model.config import StudentConfig
from pd_lightning.model.transformer import Transformer

GAMMAS = (0.5,)  # what `pd-lightning predict` stores by default


def wchar() -> int:
    """Bytes this process has passed to write(2) so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def folder_bytes(folder: Path) -> int:
    total = 0
    for p in list(folder.iterdir()) if folder.exists() else []:
        try:
            total += p.stat().st_size
        except FileNotFoundError:  # renamed meanwhile
            pass
    return total


def run(
    teacher, batches, processor=None, out: Path | None = None, spec: CacheSpec | None = None, watch_disk: bool = False
) -> dict:
    """One pass; with ``out`` also the bytes written and (``watch_disk``: an untimed run) the peak folder size."""
    writer = BackgroundWriter(CacheWriter(out, spec, overwrite=True)) if out is not None else None
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], folder_bytes(out))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True) if watch_disk else None
    if watcher is not None:
        watcher.start()
    w0, t0, c0 = wchar(), time.perf_counter(), time.process_time()
    with torch.no_grad():
        for index, tokens in batches:
            logits = teacher(tokens[:, :-1])  # (B, L, V)
            if processor is not None:
                target = processor(logits, position_keys(index, tokens.shape[1] - 1), gammas=GAMMAS)
                if writer is not None:
                    writer.write(index, tokens, target)
    if writer is not None:
        writer.finalize()
    seconds, cpu, written = time.perf_counter() - t0, time.process_time() - c0, wchar() - w0
    if watcher is not None:
        stop.set()
        watcher.join()
        peak[0] = max(peak[0], folder_bytes(out))
    result = {"s": seconds, "cpu": cpu}
    if out is not None:
        final = folder_bytes(out)
        result.update(written=written / final, peak=peak[0] / final, size=final)
    return result


def setup(vocab: int, hidden: int, layers: int, sequences: int, seq: int, batch: int):
    torch.manual_seed(0)
    cfg = StudentConfig(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=hidden // 64,
        n_query_groups=max(1, hidden // 256), intermediate_size=int(hidden * 8 / 3) // 16 * 16,
    )  # fmt: skip
    teacher = Transformer(cfg).eval()
    tokens = torch.randint(0, vocab, (sequences, seq + 1))
    batches = [(torch.arange(i, min(i + batch, sequences)), tokens[i : i + batch])
               for i in range(0, sequences, batch)]  # fmt: skip
    processor = TopPK(0.95, 100)
    spec = CacheSpec.for_processor(
        processor, vocab_size=vocab, seq_len=seq, num_sequences=sequences, teacher_fingerprint="bench",
        tokenizer_fingerprint="bench", source_fingerprint="bench", shard_tokens=max(seq, sequences * seq // 4),
        power_gammas=GAMMAS,
    )  # fmt: skip
    return cfg, teacher, batches, processor, spec


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.4f} (min {min(xs):.4f}, max {max(xs):.4f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--sequences", type=int, default=24)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--real-vocab", type=int, default=480)
    ap.add_argument("--real-hidden", type=int, default=640)
    ap.add_argument("--real-layers", type=int, default=7)
    ap.add_argument("--real-sequences", type=int, default=8)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")

    small = setup(args.vocab, args.hidden, args.layers, args.sequences, args.seq, args.batch)
    real = setup(args.real_vocab, args.real_hidden, args.real_layers, args.real_sequences, args.seq, args.batch)
    tmp = Path(tempfile.mkdtemp(prefix="pd-bench-"))
    fwd, full, proc, ratios, written, peak, real_ratios, real_proc = [], [], [], [], [], [], [], []
    cpu_ratios, real_cpu = [], []
    try:
        for _, teacher, batches, *_ in (small, real):
            run(teacher, batches[:1])  # warm-up
        for r in range(args.reps):
            _, teacher, batches, processor, spec = small
            a_run = run(teacher, batches)
            a = a_run["s"]
            b = run(teacher, batches, processor, tmp / f"small{r}", spec)
            cpu_ratios.append(b["cpu"] / a_run["cpu"])
            disk = run(teacher, batches, processor, tmp / f"disk{r}", spec, watch_disk=True)  # untimed
            c = run(teacher, batches, processor)["s"]
            fwd.append(a)
            full.append(b["s"])
            ratios.append(b["s"] / a)
            proc.append(c / a)
            written.append(b["written"])
            peak.append(disk["peak"])
            size = b["size"]
            _, teacher, batches, processor, spec = real
            d_run = run(teacher, batches)
            d = d_run["s"]
            e = run(teacher, batches, processor, tmp / f"real{r}", spec)
            real_cpu.append(e["cpu"] / d_run["cpu"])
            f = run(teacher, batches, processor)["s"]
            real_ratios.append(e["s"] / d)
            real_proc.append(f / d)
            shutil.rmtree(tmp / f"small{r}", ignore_errors=True)
            shutil.rmtree(tmp / f"disk{r}", ignore_errors=True)
            shutil.rmtree(tmp / f"real{r}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, (cfg, _, batches, _, spec) in (("small", small), ("realistic", real)):
        n = sum(t.shape[0] for _, t in batches) * args.seq
        print(
            f"{name:>9} teacher: {cfg.num_parameters() / 1e6:.1f}M params, vocab {cfg.vocab_size} "
            f"({cfg.num_parameters() / cfg.vocab_size / 1e3:.1f}k params per entry), {n} tokens, "
            f"{spec.num_shards} shards"
        )
    tokens_n = args.sequences * args.seq
    print(f"small: forward only {statistics.median(fwd):.2f} s ({tokens_n / statistics.median(fwd):,.0f} tok/s); "
          f"cache {size / 1e6:.2f} MB")  # fmt: skip
    print(f"small: (forward+process+write) / forward   {spread(ratios)}")
    print(f"small: (forward+process) / forward         {spread(proc)}")
    print(f"small: bytes written / final size          {spread(written)}")
    print(f"small: peak disk / final size              {spread(peak)}")
    print(f"realistic: (forward+process+write) / forward {spread(real_ratios)}")
    print(f"realistic: (forward+process) / forward       {spread(real_proc)}")
    print(f"CPU time (all threads), (forward+process+write) / forward: small {spread(cpu_ratios)}")
    print(f"                                                       realistic {spread(real_cpu)}")
    print(
        f"RESULT write_overhead_ratio={statistics.median(ratios):.4f} forward_s={statistics.median(fwd):.3f} "
        f"forward_process_write_s={statistics.median(full):.3f} process_only_ratio={statistics.median(proc):.4f} "
        f"bytes_written_ratio={statistics.median(written):.4f} peak_disk_ratio={statistics.median(peak):.4f} "
        f"realistic_write_ratio={statistics.median(real_ratios):.4f} "
        f"realistic_write_cpu_ratio={statistics.median(real_cpu):.4f}"
    )


if __name__ == "__main__":
    main()
