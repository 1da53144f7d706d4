"""The cross-tokenizer worked example's table (issue 20) -- `make crosstok-demo` then

    .venv/bin/python benchmarks/crosstok_demo.py runs/demo/crosstok/seeds \
        --cross_cache data/demo/cache/crosstok-8192-top-0.95-100 --same_cache data/demo/cache/top-0.95-100 \
        --prefix_cache data/demo/cache/crosstok-8192-prefix-top-0.95-100 \
        --teachers runs/demo/teacher runs/demo/crosstok/teacher [--output runs/demo/crosstok/seeds/crosstok.md]

Reads the `pd-lightning sweep` folder of the three students over seeds (LM only, vanilla PD from the same-tokenizer
teacher's cache, vanilla PD from the other-tokenizer teacher's cache under the mapping rule ``tail`` and, with
``--prefix_cache``, under ``prefix``) and prints, per seed, each student's held-out
bits per byte (``val/bpb`` at the end of its fit, on the whole held-out split of the student's token file) and the
paired Δ% = 100·(bpb_lm − bpb)/bpb_lm against the LM-only student of the same seed (positive = better); over seeds
the mean Δ% and the sample std of the paired Δ%. Bits per byte, not nats per token: the two teachers' held-out losses
are over different tokenizations, their bits per byte compare. Also per cache (``cache_info``): the teacher's
held-out bits per byte (its own held-out split), the aligned fraction and the mean mapped mass (the share of the
teacher's distribution the stored entries hold at aligned positions; for the same-tokenizer cache its mean kept
mass, every position aligned) and bytes per token.

Ends with ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from pd_lightning.cache.inspect import cache_info
from pd_lightning.sweep import read_metrics


def last(run_dir: Path, key: str) -> float | None:
    values = [r[key] for r in read_metrics(run_dir) if key in r]
    return values[-1] if values else None


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="the sweep folder (holds results.jsonl)")
    p.add_argument("--cross_cache", type=Path, required=True)
    p.add_argument("--same_cache", type=Path, required=True)
    p.add_argument("--prefix_cache", type=Path, help="the other-tokenizer cache under rule prefix (optional)")
    p.add_argument("--teachers", type=Path, nargs=2, metavar=("SAME", "CROSS"), help="the two teachers' run folders")
    p.add_argument("--baseline", default="student_lm")
    p.add_argument("--same", default="student_vanilla_pd")
    p.add_argument("--cross", default="student_vanilla_pd_crosstok")
    p.add_argument("--prefix", default="student_vanilla_pd_crosstok_prefix")
    p.add_argument("--output", type=Path, help="also write the tables to this markdown file")
    args = p.parse_args(argv)

    rows = [json.loads(line) for line in (args.sweep / "results.jsonl").read_text().splitlines() if line.strip()]
    by = {(r["name"], r["seed"]): r for r in rows}
    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    names = [("LM only", args.baseline), ("vanilla PD, same tokenizer", args.same),
             ("vanilla PD, other tokenizer (tail)", args.cross)]  # fmt: skip
    if args.prefix_cache:
        names.append(("vanilla PD, other tokenizer (prefix)", args.prefix))
    for _, name in names:
        missing = [s for s in seeds if (name, s) not in by or by[(name, s)].get("val_bpb") is None]
        if missing:
            raise SystemExit(f"crosstok_demo: {name} has no val_bpb for seed(s) {missing} in {args.sweep}")

    short = {args.same: "same tok.", args.cross: "other tok. (tail)", args.prefix: "other tok. (prefix)"}
    deltas: dict[str, list[float]] = {name: [] for _, name in names[1:]}
    lines = ["| seed | " + " | ".join(f"{label} bits/byte" for label, _ in names)
             + "".join(f" | Δ% {short[n]}" for n in deltas) + " |",
             "|---" * (1 + len(names) + len(deltas)) + "|"]  # fmt: skip
    for s in seeds:
        base = by[(args.baseline, s)]["val_bpb"]
        cells = [f"{by[(name, s)]['val_bpb']:.4f}" for _, name in names]
        for name in deltas:
            deltas[name].append(100.0 * (base - by[(name, s)]["val_bpb"]) / base)
        lines.append(f"| {s} | " + " | ".join(cells) + "".join(f" | {deltas[n][-1]:+.2f}" for n in deltas) + " |")
    mean_bpb = [statistics.fmean(by[(name, s)]["val_bpb"] for s in seeds) for _, name in names]
    stat = {n: (statistics.fmean(d), statistics.stdev(d) if len(d) > 1 else 0.0) for n, d in deltas.items()}
    lines.append(
        "| mean ± std | " + " | ".join(f"{b:.4f}" for b in mean_bpb)
        + "".join(f" | {stat[n][0]:+.2f} ± {stat[n][1]:.2f}" for n in deltas) + " |"
    )  # fmt: skip
    students = "\n".join(lines) + "\n"

    same_info, cross_info = cache_info(args.same_cache), cache_info(args.cross_cache)
    teacher_bpb = [last(t, "val/bpb") for t in args.teachers] if args.teachers else [None, None]
    caches = "\n".join(
        [
            "| teacher's cache | teacher held-out bits/byte | aligned fraction | mean mapped mass | cache B/token |",
            "|---|---|---|---|---|",
            f"| same tokenizer ({args.same_cache.name}) | {_f(teacher_bpb[0])} | 1 (every position) "
            f"| {same_info['mean_kept_mass']:.4f} (kept mass) | {same_info['bytes_per_token']:.1f} |",
            f"| other tokenizer ({args.cross_cache.name}) | {_f(teacher_bpb[1])} "
            f"| {cross_info['aligned_fraction']:.4f} | {cross_info['mean_mapped_mass']:.4f} "
            f"| {cross_info['bytes_per_token']:.1f} |",
        ]
    )
    if args.prefix_cache:
        prefix_info = cache_info(args.prefix_cache)
        caches += (
            f"\n| other tokenizer, rule prefix ({args.prefix_cache.name}) | {_f(teacher_bpb[1])} "
            f"| {prefix_info['aligned_fraction']:.4f} | {prefix_info['mean_mapped_mass']:.4f} "
            f"| {prefix_info['bytes_per_token']:.1f} |"
        )
    caches += "\n"
    text = f"Held-out bits per byte, Δ% paired with LM-only of the same seed:\n\n{students}\nCaches:\n\n{caches}"
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    result = {
        "delta_bpb_same_mean": stat[args.same][0],
        "delta_bpb_same_std": stat[args.same][1],
        "delta_bpb_cross_mean": stat[args.cross][0],
        "delta_bpb_cross_std": stat[args.cross][1],
        "delta_bpb_cross_min": min(deltas[args.cross]),
        "aligned_fraction": cross_info["aligned_fraction"],
        "mean_mapped_mass": cross_info["mean_mapped_mass"],
        "same_mean_kept_mass": same_info["mean_kept_mass"],
    }
    if args.prefix_cache:
        result.update(
            delta_bpb_prefix_mean=stat[args.prefix][0],
            delta_bpb_prefix_std=stat[args.prefix][1],
            delta_bpb_prefix_min=min(deltas[args.prefix]),
            prefix_mean_mapped_mass=prefix_info["mean_mapped_mass"],
        )
    print("RESULT " + " ".join(f"{k}={v:.4f}" for k, v in result.items()))
    return result


def _f(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    main()
