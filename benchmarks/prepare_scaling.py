"""Scaling of ``pd-lightning prepare``: peak memory against corpus size, throughput against worker count.

Corpus: the embedded corpus (the running Python's documentation, ~1.75 MB of text) written as ``.jsonl``; a
4,096-entry BPE is trained on it once and given with ``--tokenizer`` to every measured run (the teacher's tokenizer
is given in a real pre-training run, and BPE training is not what these figures are about).

- Memory: ``pd-lightning prepare`` as a subprocess on the corpus and on the same corpus repeated ``--copies`` times
  (default 8), ``--workers 2 --chunk_mb 1``; the peak of the summed RSS of the process and its worker processes,
  sampled every 20 ms with psutil (``--mem-reps`` runs each, interleaved, median). ``rss_ratio`` = big ÷ small: 1.0
  means memory does not grow with the corpus.
- Speed: ``prepare()`` in this process on the corpus repeated ``--speed-copies`` times (default 4), ``--chunk_mb
  0.5`` (14 pieces, so two workers have enough to share), with ``--workers 1`` and ``--workers 2``, in ``--reps``
  interleaved pairs (order alternating); tokens/s = tokens written ÷ wall time (worker start-up included).
  ``speedup_2_workers`` = median of the paired ratios (2 workers ÷ 1 worker); their spread (min/max) is printed.
  The profile of what limits it: the CPU time the run obtained (this process + its workers, from getrusage) per
  wall second, ``cores_1_worker`` / ``cores_2_workers``; on a machine other jobs keep busy, a second worker gets
  little CPU and the speed-up is bounded by ``cores_2_workers / cores_1_worker``.
Each worker tokenizes with one thread (``TOKENIZERS_PARALLELISM=false`` in the workers), so ``--workers`` is the
parallelism. The last line is ``RESULT rss_ratio=... speedup_2_workers=... ...``.

Run: ``.venv/bin/python benchmarks/prepare_scaling.py [--reps 7] [--copies 8]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil


def write_corpus(path: Path, copies: int) -> int:
    from pd_lightning.corpus.builtin import builtin_documents

    lines = [json.dumps({"text": t}) + "\n" for t in builtin_documents()]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(copies):
            f.writelines(lines)
    return path.stat().st_size


def peak_rss(cmd: list[str], env: dict) -> tuple[float, float]:
    """(peak summed RSS of the process tree in MiB, wall seconds) of one subprocess run."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed: {err[-2000:]}")
    return peak / 2**20, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--speed-copies", type=int, default=4)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--mem-reps", type=int, default=3)
    args = ap.parse_args()

    import torch

    from pd_lightning.corpus.prepare import prepare

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"torch threads: {torch.get_num_threads()}, CPUs available: {len(os.sched_getaffinity(0))}, "
          f"load average: {os.getloadavg()[0]:.1f} (the machine is shared: figures are noisy)")  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="prepare-scaling-"))
    try:
        small, big, speed = tmp / "small.jsonl", tmp / "big.jsonl", tmp / "speed.jsonl"
        sizes = {p: write_corpus(p, c) for p, c in ((small, 1), (big, args.copies), (speed, args.speed_copies))}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            prepare(input=[str(small)], output=str(tmp / "tok" / "tokens.h5"), vocab_size=4096, workers=0)
        tok = str(tmp / "tok" / "tokenizer")
        pd = str(Path(sys.executable).with_name("pd-lightning"))

        # ---- memory: corpus vs corpus x copies, interleaved ------------------------------------------------------
        rss: dict[str, list[float]] = {"small": [], "big": []}
        for r in range(args.mem_reps):
            for name, path in (("small", small), ("big", big)):
                out = tmp / f"mem-{name}-{r}" / "tokens.h5"
                cmd = [pd, "prepare", "--input", str(path), "--tokenizer", tok, "--output", str(out), "--workers", "2",
                       "--chunk_mb", "1", "--seq_len", "256"]  # fmt: skip
                mib, wall = peak_rss(cmd, env)
                rss[name].append(mib)
                print(f"memory rep {r}: {name:5s} corpus {sizes[path] / 2**20:6.1f} MiB -> peak RSS {mib:7.1f} MiB "
                      f"({wall:.1f} s)")  # fmt: skip
                shutil.rmtree(out.parent)
        rss_small, rss_big = statistics.median(rss["small"]), statistics.median(rss["big"])

        # ---- speed: 1 vs 2 workers, interleaved pairs -------------------------------------------------------------
        tps: dict[int, list[float]] = {1: [], 2: []}
        cores: dict[int, list[float]] = {1: [], 2: []}  # CPU-seconds the run got per wall second
        for r in range(args.reps):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                out = tmp / f"speed-{workers}-{r}" / "tokens.h5"
                cpu0 = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    s = prepare(input=[str(speed)], output=str(out), tokenizer=tok, workers=workers, chunk_mb=0.5)
                wall = time.perf_counter() - start
                cpu1 = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
                cpu = sum(b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(cpu0, cpu1))
                tps[workers].append(s["num_tokens"] / wall)
                cores[workers].append(cpu / wall)
                shutil.rmtree(out.parent)
            print(f"speed rep {r}: 1 worker {tps[1][-1]:9,.0f} tok/s ({cores[1][-1]:.2f} cores busy), 2 workers "
                  f"{tps[2][-1]:9,.0f} tok/s ({cores[2][-1]:.2f} cores busy), ratio {tps[2][-1] / tps[1][-1]:.2f}, "
                  f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        ratios = [b / a for a, b in zip(tps[1], tps[2])]
        t1, t2 = statistics.median(tps[1]), statistics.median(tps[2])
        print(f"peak RSS median: {rss_small:.1f} MiB ({sizes[small] / 2**20:.1f} MiB corpus), {rss_big:.1f} MiB "
              f"({sizes[big] / 2**20:.1f} MiB corpus, x{args.copies})")  # fmt: skip
        print(f"tokens/s median: 1 worker {t1:,.0f}, 2 workers {t2:,.0f}; "
              f"paired ratio median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}, "
              f"{len(ratios)} pairs)")  # fmt: skip
        c1, c2 = statistics.median(cores[1]), statistics.median(cores[2])
        print(f"CPU obtained (CPU-seconds of this process and its workers per wall second, median): 1 worker {c1:.2f}, "
              f"2 workers {c2:.2f}; a ratio of {c2 / c1:.2f} bounds the speed-up this machine allowed")  # fmt: skip
        print(
            f"RESULT rss_ratio={rss_big / rss_small:.3f} speedup_2_workers={statistics.median(ratios):.3f} "
            f"rss_small_mib={rss_small:.1f} rss_big_mib={rss_big:.1f} "
            f"tokens_per_s_1_worker={t1:.0f} tokens_per_s_2_workers={t2:.0f} cores_1_worker={c1:.2f} "
            f"cores_2_workers={c2:.2f}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
