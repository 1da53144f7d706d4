"""Size of a teacher-logit cache from a real (trained) teacher on real text: top-0.95-100, top-1.0-100 (+ 0.8, 0.5).

    .venv/bin/python benchmarks/cache_size.py

Uses the demo pipeline's artefacts, building what is missing through the CLI as a user would: the embedded
corpus (`pd-lightning prepare --input builtin`), the demo teacher trained on it for a few minutes
(`pd-lightning fit --config configs/demo/teacher.yaml`), then one `pd-lightning predict` per processor over the
held-out split (text the teacher never trained on) and `pd-lightning cache-info --json` on each cache.
Last line: ``RESULT p095_bytes_per_entry=... p095_bytes_per_token=... p095_mean_entries_per_token=... (same for
p1 = top-1.0-100, p08 = top-0.8-100, p05 = top-0.5-100)``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pd_lightning.cli"]
TOKENS = ROOT / "data/demo/tokens.h5"
TEACHER = ROOT / "runs/demo/teacher/teacher.ckpt"


def sh(*args: str) -> str:
    print("$ pd-lightning", " ".join(args), flush=True)
    return subprocess.run([*CLI, *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def main() -> None:
    if not TOKENS.exists():
        sh("prepare", "--input", "builtin", "--output", str(TOKENS), "--seq_len", "256", "--vocab_size", "4096")
    if not TEACHER.exists():
        sh("fit", "--config", "configs/demo/teacher.yaml")
    results = {}
    # top-0.8 and top-0.5 too: with a small teacher (high entropy) p = 0.95 rarely truncates before k = 100.
    for name, p in (("p095", "0.95"), ("p1", "1.0"), ("p08", "0.8"), ("p05", "0.5")):
        out = ROOT / f"data/bench/cache-val-top-{p}-100"
        sh(
            "predict", "--config", "configs/cache/top-0.95-100.yaml",
            "--model.teacher", str(TEACHER), "--model.processor.init_args.p", p,
            "--data.split", "val", "--writer.output", str(out), "--writer.overwrite", "true",
            "--trainer.enable_progress_bar", "false",
        )  # fmt: skip
        info = json.loads(sh("cache-info", str(out), "--json", "true").strip().splitlines()[-1])
        results[name] = info
        print(
            f"top-{p}-100: {info['tokens']:,} tokens, {info['bytes_per_entry']:.3f} B/entry, "
            f"{info['bytes_per_token']:.1f} B/token, {info['mean_entries_per_token']:.2f} entries/token, "
            f"kept mass {info['mean_kept_mass']:.3f}, bookkeeping {info.get('bookkeeping_bytes_per_token', 0):.2f} "
            f"B/token, stats {info.get('stats_bytes_per_token', 0):.2f} B/token"
        )
    fields = []
    for name, info in results.items():
        fields += [
            f"{name}_bytes_per_entry={info['bytes_per_entry']:.4f}",
            f"{name}_bytes_per_token={info['bytes_per_token']:.2f}",
            f"{name}_mean_entries_per_token={info['mean_entries_per_token']:.2f}",
        ]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
