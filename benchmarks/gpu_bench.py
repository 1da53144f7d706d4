"""GPU figures of issue 11, in one run: student step throughput / MFU (LM-only vs sparse KD, fused vs unfused loss) and
the teacher's cache-writing throughput. Run by ``benchmarks/gpu_check.sh``.

    .venv/bin/python benchmarks/gpu_bench.py [--layers 12 --teacher-layers 8 --reps 7]
    .venv/bin/python benchmarks/gpu_bench.py --dry-run     # tiny shapes on CPU (what tests/test_gpu_check.py runs)

Student: the 1.9B preset's shape (hidden 2048, 16 heads, 2 KV groups, SwiGLU 6912, vocabulary 151,552) with its 24
layers reduced to ``--layers`` (default 12, so the unfused variant's (tokens x vocab) buffers fit beside it on an
80 GB card; the output head's share of the FLOPs is larger than in the full 24 layers). One optimizer step = forward
+ backward + AdamW of ``DistillationModule`` under bf16 autocast, batch ``--batch`` x ``--seq`` tokens. Variants:
LM-only and KD (KLD at tau 1, alpha 0.5, sparse top-0.95-100-shaped targets, ``benchmarks/kd_overhead.py``), each
with the fused and the unfused loss. Repetitions interleave the four variants. MFU = model FLOPs per step (Lightning's
``measure_flops`` of the student's forward + backward with its full head: the same numerator for every variant) x
steps/s / the card's peak bf16 FLOPs (Lightning's ``get_available_flops``); ``kd_over_lm`` = median of the paired
(KD step time / LM step time) ratios of the fused loss (the default).

Teacher: an HF ``LlamaForCausalLM`` in bf16 of a Llama-3-8B-like shape (hidden 4096, 32 heads, 8 KV heads, SwiGLU
14336) with the GLM-4 vocabulary (151,552), layers reduced to ``--teacher-layers`` (default 8). ``write_ratio`` =
median paired ratio of (forward + TopPK(0.95, 100) with the stored statistics + background HDF5 cache writing,
finalisation included) / forward alone over the same batches, as ``pd-lightning predict`` does it (the target stays
on the device; the writer thread compacts it). Random weights (costs do not depend on them).

Last line: ``RESULT mfu_lm=... mfu_kd=... kd_over_lm=... write_ratio=... device=...`` (plus the tokens/s figures).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.kd_overhead import sparse_targets
from pd_lightning.cache.format import CacheSpec
from pd_lightning.cache.writer import BackgroundWriter, CacheWriter
from pd_lightning.distill.losses import KLD
from pd_lightning.distill.processors import TopPK, position_keys
from pd_lightning.distill.schedules import Constant
from pd_lightning.model.config import StudentConfig
from pd_lightning.module import DistillationModule
from pd_lightning.throughput import student_flops_per_batch

GAMMAS = (0.5,)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.4g} (min {min(xs):.4g}, max {max(xs):.4g})"


def student_bench(args, device: torch.device, dtype: torch.dtype) -> dict:
    shape = dict(n_embd=args.hidden, n_layer=args.layers, n_head=args.heads, n_query_groups=args.kv_groups)
    cfg = StudentConfig(vocab_size=args.vocab, intermediate_size=args.intermediate, **shape)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    n = args.batch * args.seq
    batch.update(
        {
            k: v.view(args.batch, args.seq, *v.shape[1:])
            for k, v in sparse_targets(n, args.vocab, 100, 25.0, gen).items()
        }
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    torch.manual_seed(0)
    with device:  # built and initialised on the device (a 1B+ model initialises slowly on the host)
        module = DistillationModule(cfg, lr=1e-4, loss=KLD(), alpha=Constant(0.5), max_steps=10**6)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=device.type == "cuda")
    flops = student_flops_per_batch(module, (args.batch, args.seq))
    from lightning.fabric.utilities.throughput import get_available_flops

    peak = get_available_flops(device, dtype) if device.type == "cuda" else None
    variants = {(kd, fused): None for kd in (False, True) for fused in (True, False)}

    def step(kd: bool, fused: bool) -> float:
        module.fused_loss = fused
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = module._loss(batch, 0.5 if kd else 0.0)
        out.total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - t0

    for v in variants:  # warm-up (allocator, kernels)
        step(*v)
    times = {v: [] for v in variants}
    for _ in range(args.reps):
        for v in variants:
            times[v].append(step(*v))
    med = {v: statistics.median(t) for v, t in times.items()}
    names = {
        (False, True): "lm_fused",
        (True, True): "kd_fused",
        (False, False): "lm_unfused",
        (True, False): "kd_unfused",
    }
    res = {}
    for v, name in names.items():
        tok_s = n / med[v]
        mfu = None if flops is None or peak is None else flops / med[v] / peak
        res[f"tok_s_{name}"] = tok_s
        res[f"mfu_{name}"] = mfu
        mfu_text = "n/a (no peak FLOPs for this device)" if mfu is None else f"{mfu:.3f}"
        print(f"student {name:10s} step {spread(times[v])} s  tokens/s {tok_s:,.0f}  MFU {mfu_text}")
    ratios = [k / lm for k, lm in zip(times[(True, True)], times[(False, True)], strict=True)]
    unfused = [u / f for u, f in zip(times[(True, False)], times[(True, True)], strict=True)]
    print(f"student KD/LM step time (fused), paired: {spread(ratios)}")
    print(f"student unfused/fused step time (KD), paired: {spread(unfused)}")
    print(
        f"model FLOPs per step {flops}  peak FLOPs {peak}  parameters {sum(p.numel() for p in module.parameters()):,}"
    )
    res["kd_over_lm"] = statistics.median(ratios)
    res["unfused_over_fused"] = statistics.median(unfused)
    return res


def teacher_bench(args, device: torch.device, dtype: torch.dtype) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.teacher_hidden, intermediate_size=args.teacher_intermediate,
        num_hidden_layers=args.teacher_layers, num_attention_heads=args.teacher_heads,
        num_key_value_heads=args.teacher_kv, max_position_embeddings=max(2048, args.seq),
    )  # fmt: skip
    torch.manual_seed(0)
    with device:
        teacher = LlamaForCausalLM(cfg).to(dtype=dtype).eval()
    gen = torch.Generator().manual_seed(1)
    seqs = args.teacher_sequences
    tokens = torch.randint(0, args.vocab, (seqs, args.seq + 1), generator=gen)
    batches = [
        (torch.arange(i, min(i + args.batch, seqs)), tokens[i : i + args.batch]) for i in range(0, seqs, args.batch)
    ]
    processor = TopPK(0.95, 100)
    spec = CacheSpec.for_processor(
        processor, vocab_size=args.vocab, seq_len=args.seq, num_sequences=seqs, teacher_fingerprint="bench",
        tokenizer_fingerprint="bench", source_fingerprint="bench", shard_tokens=max(args.seq, seqs * args.seq // 4),
        power_gammas=GAMMAS,
    )  # fmt: skip
    out = Path(tempfile.mkdtemp(prefix="gpu-bench-cache-"))

    def run(write: bool) -> float:
        writer = BackgroundWriter(CacheWriter(out / "cache", spec, overwrite=True)) if write else None
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            for index, rows in batches:
                dev_rows = rows.to(device)
                logits = teacher(dev_rows[:, :-1]).logits  # (B, L, V)
                if writer is not None:  # as TeacherLogits.predict_step + CacheWriterCallback
                    target = processor(logits, position_keys(index.to(device), args.seq), gammas=GAMMAS)
                    writer.write(index, rows, target)
        if writer is not None:
            writer.finalize()
        sync(device)
        return time.perf_counter() - t0

    run(False), run(True)  # warm-up
    fwd, full = [], []
    for _ in range(args.reps):
        fwd.append(run(False))
        full.append(run(True))
    ratios = [w / f for w, f in zip(full, fwd, strict=True)]
    n = seqs * args.seq
    print(f"teacher forward only      {spread(fwd)} s  tokens/s {n / statistics.median(fwd):,.0f}")
    print(f"teacher forward+topk+write {spread(full)} s  tokens/s {n / statistics.median(full):,.0f}")
    print(f"teacher write overhead (paired ratio): {spread(ratios)}")
    return {"write_ratio": statistics.median(ratios), "teacher_tok_s": n / statistics.median(full),
            "teacher_fwd_tok_s": n / statistics.median(fwd)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, 2 repetitions (tests the script)")
    ap.add_argument("--layers", type=int, default=12, help="student layers (the 1.9B preset has 24)")
    ap.add_argument("--teacher-layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--teacher-sequences", type=int, default=32)
    args = ap.parse_args(argv)
    args.hidden, args.heads, args.kv_groups, args.intermediate, args.vocab = 2048, 16, 2, 6912, 151_552
    args.teacher_hidden, args.teacher_heads, args.teacher_kv, args.teacher_intermediate = 4096, 32, 8, 14336
    if args.dry_run:
        args.hidden, args.heads, args.kv_groups, args.intermediate, args.vocab = 64, 4, 2, 176, 512
        args.teacher_hidden, args.teacher_heads, args.teacher_kv, args.teacher_intermediate = 64, 4, 2, 128
        args.layers, args.teacher_layers, args.batch, args.seq, args.reps, args.teacher_sequences = 2, 2, 2, 32, 2, 8
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(
        f"device {name}  dtype {dtype}  torch threads {torch.get_num_threads()}  reps {args.reps}  "
        f"dry_run {args.dry_run}"
    )
    if not cuda and not args.dry_run:
        raise SystemExit("gpu_bench.py: no CUDA device; use --dry-run for the CPU check of the script")
    res = {**student_bench(args, device, dtype), **teacher_bench(args, device, dtype)}
    fmt = {k: ("na" if v is None else f"{v:.4g}") for k, v in res.items()}
    print(
        f"RESULT mfu_lm={fmt['mfu_lm_fused']} mfu_kd={fmt['mfu_kd_fused']} kd_over_lm={fmt['kd_over_lm']} "
        f"write_ratio={fmt['write_ratio']} mfu_lm_unfused={fmt['mfu_lm_unfused']} "
        f"mfu_kd_unfused={fmt['mfu_kd_unfused']} "
        f"tok_s_lm={fmt['tok_s_lm_fused']} tok_s_kd={fmt['tok_s_kd_fused']} teacher_tok_s={fmt['teacher_tok_s']} "
        f"device={name.replace(' ', '_')}"
    )


if __name__ == "__main__":
    main()
