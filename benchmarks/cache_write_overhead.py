"""Overhead of caching a teacher's logits, and what writing the cache costs in disk traffic and disk space.

    .venv/bin/python benchmarks/cache_write_overhead.py [--reps 9] [--sequences 24] [--real-sequences 32] [--threads N]
        [--realistic-only | --cross-only]

Time: (teacher forward + TopPK processing with the stored statistics + background HDF5 writing, finalisation
included) ÷ the teacher forward alone, over the same tokens, in one run, at two teacher shapes:

- ``small`` (today's): Llama-layout, hidden 512, 4 layers, vocab 4,096 (~3.7k parameters per vocabulary entry);
- ``realistic``: the parameters per vocabulary entry of a real teacher/tokenizer pair (GLM-4-9B: 9.4e9 / 151,552
  ≈ 62k) scaled down to what a CPU runs: hidden 640, 7 layers, vocab 480 (~63k per entry). The cost of top-p-k
  and of writing grows with the vocabulary, the forward with the parameters, so this ratio is what it would be on
  a real teacher. 32 sequences (8,192 tokens, ~9 s of forward on one thread) per repetition: with 8 the paired
  ratios spread from 0.89 to 1.08 (and 1.01 to 1.30 in another run).

Disk (write-once cache, measured on the small shape's write runs): ``bytes_written_ratio`` = bytes the process
passed to write(2) during the run (``/proc/self/io`` ``wchar``) ÷ the final cache size; ``peak_disk_ratio`` = the
largest total size of the cache folder seen during an extra, untimed write run (sampled every 2 ms) ÷ the final
size.

CPU-time ratios (``time.process_time``, all threads) are printed too: on this shared machine they are far less
sensitive to other processes than wall time, and they count the writer thread's work, which on a GPU machine runs on
an otherwise idle host core. ``--threads`` sets torch's thread count; the default, all cores but one, leaves a core to
the writer thread, as a GPU machine's host has idle cores (with ``--threads 2`` on a 2-core CPU the writer thread
competes with the forward's threads).

The process runs with glibc's malloc keeping freed memory (``GLIBC_TUNABLES`` ``mmap_max=0``, ``trim_threshold``
64 GiB, set by re-executing itself; ``--system-malloc`` runs without): otherwise freed memory goes back to the kernel
(large tensors are unmapped on free, the heap's top is trimmed) and is faulted in and zeroed again on the next
use, ~10 % of a run here, at a cost that varies with what ran before (this VM reports freed pages to its host) --
noise larger than the effect measured. The minor page faults per
run are printed, with the torch thread count and the load average. Random weights (the cost does not depend on
them). Repetitions alternate the variants (the realistic shape's three in an order rotated every repetition);
ratios are medians of paired ratios, with their min/max. Last line: ``RESULT write_overhead_ratio=... forward_s=...
forward_process_write_s=... process_only_ratio=... bytes_written_ratio=... peak_disk_ratio=...
realistic_write_ratio=... realistic_write_cpu_ratio=... cross_tokenizer_write_ratio=...
cross_tokenizer_write_cpu_ratio=...``.

Cross-tokenizer cost (issue 20): the whole cache-writing work for a teacher with another tokenizer than the
student's ÷ the same for a teacher sharing the student's tokenizer, at the realistic shape, on real text (the
embedded corpus, documents joined by end-of-text). Two byte-level BPEs are trained at start (``train_bpe``, ~3 s):
the teacher's, 480 entries on the corpus's even documents (the realistic shape's vocabulary), and the student's,
``--student-vocab`` (512) entries on its odd documents. Two variants per repetition, order alternating:

- ``same``: the text tokenized by the teacher's tokenizer (the student's tokenizer is the teacher's), rows of
  ``seq + 1`` ids, the ordinary path: forward + TopPK + write (the ``write`` variant above, on text);
- ``cross``: the same text tokenized by the student's tokenizer, as many rows; per batch what
  ``TeacherLogits._cross_tokenizer_step`` does: align each row with the teacher's tokenization
  (``TokenizerPair.teacher_batch``), the teacher's forward over its own right-padded ids, gather at the aligned
  positions + TopPK + the vocabulary map (``TokenizerPair.targets``), and the write of the student-id targets.

The tokenizers cut the text into different numbers of tokens, so the two variants' rows hold different amounts of
text (and the teacher runs over a different number of its own tokens): each time is divided by the UTF-8 bytes of
its rows' predicted positions (the text the teacher reads), and ``cross_tokenizer_write_ratio`` is the median of the
paired ratios of time per byte (the ratio per student position is printed too).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from pd_lightning.cache.format import CacheSpec
from pd_lightning.cache.writer import BackgroundWriter, CacheWriter
from pd_lightning.corpus.builtin import builtin_documents
from pd_lightning.corpus.tokenizer import tokenizer_fingerprint, train_bpe
from pd_lightning.crosstok.pair import TokenizerPair
from pd_lightning.distill.processors import TopPK, position_keys
from pd_lightning.model.config import StudentConfig
from pd_lightning.model.transformer import Transformer

GAMMAS = (0.5,)  # what `pd-lightning predict` stores by default
KEEP_FREED = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def keep_freed_memory() -> None:
    """Re-execute this script once with glibc's malloc keeping freed memory (no page faults per run)."""
    if "--system-malloc" in sys.argv or os.environ.get("PD_BENCH_MALLOC") == "kept":
        return
    os.environ["GLIBC_TUNABLES"] = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), KEEP_FREED) if t)
    os.environ["PD_BENCH_MALLOC"] = "kept"
    os.execv(sys.executable, [sys.executable, *sys.argv])


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
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
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
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    if watcher is not None:
        stop.set()
        watcher.join()
        peak[0] = max(peak[0], folder_bytes(out))
    result = {"s": seconds, "cpu": cpu, "faults": faults}
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


def cross_setup(teacher, seq: int, sequences: int, batch: int, student_vocab: int, folder: Path):
    """The two tokenizers, the pair, and both variants' rows over the same text (module docstring)."""
    docs = list(builtin_documents())
    vocab = teacher.config.vocab_size
    train_bpe(docs[0::2], vocab, folder / "teacher")
    train_bpe(docs[1::2], student_vocab, folder / "student")
    pair = TokenizerPair.load(
        str(folder / "student"), student_vocab, str(folder / "teacher"), vocab, "tail",
        student_flag="student", teacher_flag="teacher", rule_flag="rule",
    )  # fmt: skip

    def rows_of(tok) -> torch.Tensor:
        stream, need = [], sequences * (seq + 1)
        for d in docs:
            stream += [*tok.encode(d, add_special_tokens=False), tok.eos_token_id]
            if len(stream) >= need:
                break
        return torch.tensor(stream[:need], dtype=torch.int64).view(sequences, seq + 1)

    out = {}
    for name, tok, table in (("same", pair.teacher_tok, pair.teacher), ("cross", pair.student_tok, pair.student)):
        tokens = rows_of(tok)
        batches = [(torch.arange(i, min(i + batch, sequences)), tokens[i : i + batch])
                   for i in range(0, sequences, batch)]  # fmt: skip
        nbytes = sum(len(table.join(r[:-1])) for r in tokens.tolist())
        processor = TopPK(0.95, 100)
        spec = CacheSpec.for_processor(
            processor, vocab_size=len(table), seq_len=seq, num_sequences=sequences, teacher_fingerprint="bench",
            tokenizer_fingerprint=tokenizer_fingerprint(tok), source_fingerprint="bench",
            shard_tokens=max(seq, sequences * seq // 4), power_gammas=GAMMAS,
            teacher_tokenizer_fingerprint=tokenizer_fingerprint(pair.teacher_tok) if name == "cross" else "",
            vocab_map_rule="tail" if name == "cross" else "",
        )  # fmt: skip
        out[name] = (batches, processor, spec, nbytes)
    return pair, out


def run_cross(teacher, pair: TokenizerPair, batches, processor, out: Path, spec: CacheSpec) -> dict:
    """One pass of the cross-tokenizer path (``TeacherLogits._cross_tokenizer_step`` + the writer)."""
    writer = BackgroundWriter(CacheWriter(out, spec, overwrite=True))
    aligned, mass = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for index, tokens in batches:
            length = tokens.shape[1] - 1
            ids, positions = pair.teacher_batch(tokens.tolist(), length, [f"sequence {int(s)}" for s in index])
            logits = teacher(ids)  # (B, T, V_t)
            mapped = pair.targets(logits, positions, processor, position_keys(index, length), GAMMAS)
            writer.write(index, tokens, mapped.target)
            aligned.append(positions >= 0)
            mass.append(mapped.matched)
    writer.finalize()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    matched = torch.cat(mass)
    return {
        "s": seconds, "cpu": cpu, "aligned": float(torch.cat([a.flatten() for a in aligned]).float().mean()),
        "matched": float(matched[~matched.isnan()].mean()),
    }  # fmt: skip


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
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--real-vocab", type=int, default=480)
    ap.add_argument("--real-hidden", type=int, default=640)
    ap.add_argument("--real-layers", type=int, default=7)
    ap.add_argument("--real-sequences", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores but one, for the writer)")
    ap.add_argument("--student-vocab", type=int, default=512, help="the cross-tokenizer variant's student tokenizer")
    ap.add_argument("--realistic-only", action="store_true", help="skip the small shape (RESULT fields: na)")
    ap.add_argument("--cross-only", action="store_true", help="only the cross-tokenizer pair (other fields: na)")
    ap.add_argument("--system-malloc", action="store_true", help="glibc's default malloc (page faults every run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads if args.threads > 0 else max(1, (os.cpu_count() or 2) - 1))
    load0 = os.getloadavg()
    malloc = "glibc default" if args.system_malloc else "keeps freed memory"
    print(f"torch threads: {torch.get_num_threads()}; malloc {malloc}")

    small = setup(args.vocab, args.hidden, args.layers, args.sequences, args.seq, args.batch)
    real = setup(args.real_vocab, args.real_hidden, args.real_layers, args.real_sequences, args.seq, args.batch)
    tmp = Path(tempfile.mkdtemp(prefix="pd-bench-"))
    cross_ratios, cross_cpu, cross_tok, cross_s, aligned, matched = [], [], [], {"same": [], "cross": []}, [], []
    fwd, full, proc, ratios, written, peak, real_ratios, real_proc = [], [], [], [], [], [], [], []
    cpu_ratios, real_cpu, real_faults = [], [], {"forward": [], "write": [], "process": []}
    shapes = (real,) if args.realistic_only or args.cross_only else (small, real)
    try:
        pair, cross = cross_setup(real[1], args.seq, args.real_sequences, args.batch, args.student_vocab, tmp)
        for _, teacher, batches, *_ in shapes:
            run(teacher, batches[:1])  # warm-up
        for r in range(args.reps):
            teacher = real[1]
            order = ("same", "cross") if r % 2 == 0 else ("cross", "same")
            for k in order:  # the cross-tokenizer pair, order alternating
                batches, processor, spec, _ = cross[k]
                if k == "same":
                    got = run(teacher, batches, processor, tmp / f"same{r}", spec)
                else:
                    got = run_cross(teacher, pair, batches, processor, tmp / f"cross{r}", spec)
                    aligned.append(got["aligned"])
                    matched.append(got["matched"])
                cross_s[k].append(got)
                shutil.rmtree(tmp / f"{k}{r}", ignore_errors=True)
            x, y = cross_s["cross"][-1], cross_s["same"][-1]
            per_byte = cross["same"][3] / cross["cross"][3]  # (x / bytes_cross) / (y / bytes_same)
            cross_ratios.append(x["s"] / y["s"] * per_byte)
            cross_cpu.append(x["cpu"] / y["cpu"] * per_byte)
            cross_tok.append(x["s"] / y["s"])  # both variants: as many rows, so as many student positions
            if args.cross_only:
                continue
            _, teacher, batches, processor, spec = real
            realistic = {  # the three variants, run in an order rotated every repetition
                "forward": (),
                "write": (processor, tmp / f"real{r}", spec),
                "process": (processor,),
            }
            names = list(realistic)
            names = names[r % 3 :] + names[: r % 3]
            got = {k: run(teacher, batches, *realistic[k]) for k in names}
            for k, v in got.items():
                real_faults[k].append(v["faults"])
            d_run, e, f = got["forward"], got["write"], got["process"]
            real_cpu.append(e["cpu"] / d_run["cpu"])
            real_ratios.append(e["s"] / d_run["s"])
            real_proc.append(f["s"] / d_run["s"])
            shutil.rmtree(tmp / f"real{r}", ignore_errors=True)
            if args.realistic_only:
                continue
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
            shutil.rmtree(tmp / f"small{r}", ignore_errors=True)
            shutil.rmtree(tmp / f"disk{r}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load1 = os.getloadavg()
    print(f"load average (1 min): {load0[0]:.2f} before, {load1[0]:.2f} after; {args.reps} repetitions")
    for name, (cfg, _, batches, _, spec) in (("small", small), ("realistic", real))[
        1 if args.realistic_only or args.cross_only else 0 :
    ]:
        n = sum(t.shape[0] for _, t in batches) * args.seq
        print(
            f"{name:>9} teacher: {cfg.num_parameters() / 1e6:.1f}M params, vocab {cfg.vocab_size} "
            f"({cfg.num_parameters() / cfg.vocab_size / 1e3:.1f}k params per entry), {n} tokens, "
            f"{spec.num_shards} shards"
        )
    n_same, n_cross = cross["same"][3], cross["cross"][3]
    positions = args.real_sequences * args.seq
    print(
        f"cross-tokenizer: teacher tokenizer {len(pair.teacher)} entries, student {len(pair.student)}; "
        f"{positions} student positions per variant; text bytes: same {n_same:,} ({n_same / positions:.3f} B per "
        f"position), cross {n_cross:,} ({n_cross / positions:.3f}); aligned fraction {statistics.median(aligned):.4f}, "
        f"matched mass {statistics.median(matched):.4f}"
    )
    for k in ("same", "cross"):
        s_ = statistics.median(v["s"] for v in cross_s[k])
        print(f"cross-tokenizer: {k:>5} median {s_:.2f} s ({s_ / cross[k][3] * 1e6:.1f} us per byte)")
    print(f"cross-tokenizer: (cross / same) per byte of text      {spread(cross_ratios)}")
    print(f"cross-tokenizer: (cross / same) per student position  {spread(cross_tok)}")
    print(f"cross-tokenizer: CPU time (all threads), per byte     {spread(cross_cpu)}")
    print(f"cross-tokenizer: paired ratios per byte {[round(x, 3) for x in cross_ratios]}")
    cross_keys = (f"cross_tokenizer_write_ratio={statistics.median(cross_ratios):.4f} "
                  f"cross_tokenizer_write_cpu_ratio={statistics.median(cross_cpu):.4f}")  # fmt: skip
    if args.cross_only:
        print(
            "RESULT write_overhead_ratio=na forward_s=na forward_process_write_s=na process_only_ratio=na "
            "bytes_written_ratio=na peak_disk_ratio=na realistic_write_ratio=na realistic_write_cpu_ratio=na "
            + cross_keys
        )
        return
    print("realistic: minor page faults per run (median): "
          + ", ".join(f"{k} {statistics.median(v):,.0f}" for k, v in real_faults.items()))  # fmt: skip
    print(f"realistic: (forward+process+write) / forward {spread(real_ratios)}")
    print(f"realistic: (forward+process) / forward       {spread(real_proc)}")
    print(f"realistic: CPU time (all threads), (forward+process+write) / forward {spread(real_cpu)}")
    if args.realistic_only:
        print(
            "RESULT write_overhead_ratio=na forward_s=na forward_process_write_s=na process_only_ratio=na "
            "bytes_written_ratio=na peak_disk_ratio=na "
            f"realistic_write_ratio={statistics.median(real_ratios):.4f} "
            f"realistic_write_cpu_ratio={statistics.median(real_cpu):.4f} " + cross_keys
        )
        return
    tokens_n = args.sequences * args.seq
    print(f"small: forward only {statistics.median(fwd):.2f} s ({tokens_n / statistics.median(fwd):,.0f} tok/s); "
          f"cache {size / 1e6:.2f} MB")  # fmt: skip
    print(f"small: (forward+process+write) / forward   {spread(ratios)}")
    print(f"small: (forward+process) / forward         {spread(proc)}")
    print(f"small: bytes written / final size          {spread(written)}")
    print(f"small: peak disk / final size              {spread(peak)}")
    print(f"small: CPU time (all threads), (forward+process+write) / forward {spread(cpu_ratios)}")
    print(
        f"RESULT write_overhead_ratio={statistics.median(ratios):.4f} forward_s={statistics.median(fwd):.3f} "
        f"forward_process_write_s={statistics.median(full):.3f} process_only_ratio={statistics.median(proc):.4f} "
        f"bytes_written_ratio={statistics.median(written):.4f} peak_disk_ratio={statistics.median(peak):.4f} "
        f"realistic_write_ratio={statistics.median(real_ratios):.4f} "
        f"realistic_write_cpu_ratio={statistics.median(real_cpu):.4f} " + cross_keys
    )


if __name__ == "__main__":
    keep_freed_memory()
    main()
