"""Peak memory and time of the LM + KD loss (forward + backward): fused chunked path / naive (unfused) path.

Setting (the issue's): 2,048 tokens, vocabulary 151,552, hidden 512, fp32, top-100 sparse teacher targets
(about 90% of the teacher's mass kept), KLD at tau 1, alpha 0.9. Goal: memory ratio <= 0.10, time ratio <= 1.2.

    .venv/bin/python benchmarks/loss_memory.py [--rounds 3] [--reps 2] [--chunk-size 0]

How memory is measured (CPU): every variant runs in a fresh subprocess. After building the inputs and one warm-up
forward + backward, the worker drops the gradients, resets the kernel's peak-RSS mark (writing "5" to
``/proc/self/clear_refs`` sets VmHWM back to the current RSS), records VmRSS as the baseline, runs the timed
forward + backward passes and reads VmHWM. Peak = VmHWM - baseline: everything the loss allocates on top of its
inputs, including the gradients it returns (``hidden.grad``, ``weight.grad``). RSS counts only touched pages, and
torch's CPU tensors are written when created, so it sees real allocations. ``tracemalloc`` cannot see torch's
allocations, and ``ru_maxrss`` cannot be reset. glibc keeps freed heap memory in the process (which would hide
part of a repeated run's peak in the baseline) unless the block was mmapped, so the workers run with
``MALLOC_MMAP_THRESHOLD_=65536``: every allocation above 64 KiB is an mmap that goes back to the kernel when freed.

Time: the wall time of each forward + backward; workers alternate naive / fused (order flipped every round) so
slow drifts of a shared machine hit both, and the ratio is of the medians over all timed passes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOKENS, VOCAB, HIDDEN, KEPT = 2048, 151_552, 512, 100
ALPHA = 0.9


def _status(key: str) -> int:
    """``key`` (VmRSS / VmHWM) of this process from /proc, in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def worker(variant: str, reps: int, chunk_size: int, threads: int) -> None:
    import torch

    from pd_lightning.distill.losses import KLD
    from pd_lightning.distill.objective import lm_kd_loss
    from pd_lightning.distill.target import SparseTarget

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, generator=g).requires_grad_(True)
    weight = (torch.randn(VOCAB, HIDDEN, generator=g) * 0.02).requires_grad_(True)
    labels = torch.randint(0, VOCAB, (TOKENS,), generator=g)
    labels[::512] = -100  # document boundaries
    # Sparse targets: 100 distinct ids per position, sorted log-probs holding 90% of the mass.
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:KEPT] for _ in range(TOKENS)])
    logprobs = (torch.randn(TOKENS, KEPT, generator=g) * 2).sort(-1, descending=True).values.log_softmax(-1)
    target = SparseTarget(ids=ids, logprobs=logprobs + torch.tensor(0.9).log())
    loss = KLD()

    def step() -> float:
        start = time.perf_counter()
        out = lm_kd_loss(hidden, weight, labels, target, ALPHA, loss, None, chunk_size, fused=variant == "fused")
        out.total.backward()
        elapsed = time.perf_counter() - start
        hidden.grad = weight.grad = None
        return elapsed

    step()  # warm-up: lazy initialisation of the BLAS / thread pools
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = _status("VmRSS")
    times = [step() for _ in range(reps)]
    peak = _status("VmHWM") - baseline
    print(json.dumps({"variant": variant, "times": times, "peak_bytes": peak}))


def run_worker(variant: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, __file__, "--worker", variant, "--reps", str(args.reps)]
    cmd += ["--chunk-size", str(args.chunk_size), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="worker pairs (naive + fused), order alternating")
    parser.add_argument("--reps", type=int, default=2, help="timed forward + backward passes per worker")
    parser.add_argument("--chunk-size", type=int, default=0, help="fused chunk size (0 = automatic)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.reps, args.chunk_size, args.threads)
        return

    times: dict[str, list[float]] = {"naive": [], "fused": []}
    peaks: dict[str, list[int]] = {"naive": [], "fused": []}
    for r in range(args.rounds):
        for variant in ("naive", "fused") if r % 2 == 0 else ("fused", "naive"):
            res = run_worker(variant, args)
            times[variant] += res["times"]
            peaks[variant].append(res["peak_bytes"])
            print(
                f"round {r} {variant:5s} peak {res['peak_bytes'] / 2**20:8.1f} MiB  "
                f"times {' '.join(f'{t:.2f}' for t in res['times'])} s",
                flush=True,
            )
    naive_peak, fused_peak = max(peaks["naive"]), max(peaks["fused"])
    naive_time, fused_time = statistics.median(times["naive"]), statistics.median(times["fused"])
    print(f"median time: naive {naive_time:.2f} s, fused {fused_time:.2f} s (threads={args.threads})")
    print(
        f"RESULT fused_mem_ratio={fused_peak / naive_peak:.3f} fused_time_ratio={fused_time / naive_time:.3f} "
        f"naive_peak_mb={naive_peak / 2**20:.1f} fused_peak_mb={fused_peak / 2**20:.1f}"
    )


if __name__ == "__main__":
    main()
