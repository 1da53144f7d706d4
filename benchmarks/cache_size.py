"""Size of a teacher-logit cache from a real (trained) teacher on real text: top-0.95-100, top-1.0-100 (+ 0.8, 0.5).

    .venv/bin/python benchmarks/cache_size.py

Uses the demo pipeline's artefacts, building what is missing through the CLI as a user would: the embedded
corpus (`pd-lightning prepare --input builtin`), the demo teacher trained on it for a few minutes
(`pd-lightning fit --config configs/demo/teacher.yaml`), then one `pd-lightning predict` per processor over the
held-out split (text the teacher never trained on) and `pd-lightning cache-info --json` on each cache.
The caches are written in the default format (schema 3); top-0.95-100 is also written with ``--writer.schema 2``.

**At a 151,552-entry vocabulary** (issue 19): the teacher's fp32 top-0.95-100 targets over the same held-out
sequences, their ids mapped into 0..151,551 through the fixed one-to-one map
``np.random.default_rng(0).permutation(151552)`` (it keeps the ids' frequency skew and gives no id locality), are
written by the real ``CacheWriter`` as a schema-3 and a schema-2 cache of that vocabulary, read back by
``TeacherCache`` and compared entry by entry with the fp32 log-probs (ids must be exact); a re-implementation of
Megatron-LM's offline-KD coding (fp16 log p + ids bit-packed at 18 bits, zstd per 2,048 positions) codes the same
entries. Bytes per entry: the cache's entry storage (schema 3: blocks + block offsets + id table) ÷ entries.

Last line: ``RESULT p095_bytes_per_entry=... p095_bytes_per_token=... p095_mean_entries_per_token=... (same for
p1 = top-1.0-100, p08 = top-0.8-100, p05 = top-0.5-100) p095_v2_bytes_per_entry=... v3_bytes_per_entry_151k=...
v3_max_abs_err=... v2_bytes_per_entry_151k=... v2_max_abs_err=... megatron_bytes_per_entry_151k=...
megatron_max_abs_err=... bytes_per_entry_ratio_v3_v2_151k=...``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

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
    out = ROOT / "data/bench/cache-val-top-0.95-100-schema2"
    sh(
        "predict", "--config", "configs/cache/top-0.95-100.yaml", "--model.teacher", str(TEACHER),
        "--data.split", "val", "--writer.output", str(out), "--writer.overwrite", "true", "--writer.schema", "2",
        "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    v2 = json.loads(sh("cache-info", str(out), "--json", "true").strip().splitlines()[-1])
    print(
        f"top-0.95-100, schema 2: {v2['bytes_per_entry']:.3f} B/entry, {v2['bytes_per_token']:.1f} B/token "
        f"(schema 3: {results['p095']['bytes_per_entry']:.3f} B/entry, {results['p095']['bytes_per_token']:.1f} "
        f"B/token; {v2['entries']} = {results['p095']['entries']} entries)"
    )
    big = at_151k()
    fields = [f"p095_v2_bytes_per_entry={v2['bytes_per_entry']:.4f}"]
    for key, value in big.items():
        fields.append(f"{key}={value:.4g}")
    for name, info in results.items():
        fields += [
            f"{name}_bytes_per_entry={info['bytes_per_entry']:.4f}",
            f"{name}_bytes_per_token={info['bytes_per_token']:.2f}",
            f"{name}_mean_entries_per_token={info['mean_entries_per_token']:.2f}",
        ]
    print("RESULT " + " ".join(fields))


BIG_VOCAB = 151_552


def at_151k(sequences: int | None = None) -> dict[str, float]:
    """Schema 3, schema 2 and the Megatron-like coding of the teacher's fp32 top-0.95-100 held-out targets at a
    151,552-entry vocabulary (see the module docstring); each read back and compared with the fp32 log p."""
    import h5py
    import torch
    from entry_codec_size import megatron_like

    from pd_lightning.cache import CacheSpec, CacheWriter, TeacherCache, cache_info
    from pd_lightning.distill.processors import TopPK
    from pd_lightning.teacher import load_teacher

    torch.manual_seed(0)
    teacher = load_teacher(str(TEACHER))
    with h5py.File(TOKENS) as f:
        rows = f["val"][:sequences] if sequences else f["val"][:]
    n, length = rows.shape[0], rows.shape[1] - 1
    perm = torch.from_numpy(np.random.default_rng(0).permutation(BIG_VOCAB))
    proc = TopPK(0.95, 100)
    spec = CacheSpec.for_processor(
        proc, vocab_size=BIG_VOCAB, seq_len=length, num_sequences=n, teacher_fingerprint="demo teacher, ids mapped",
        tokenizer_fingerprint="demo", source_fingerprint="val", power_gammas=(0.5,),
    )  # fmt: skip
    scratch = Path(tempfile.mkdtemp(prefix="cache151k-", dir=ROOT / "data/bench"))
    writers = {s: CacheWriter(scratch / f"schema{s}", spec, schema=s) for s in (2, 3)}
    counts, ids, lps = [], [], []
    with torch.no_grad():
        for s in range(0, n, 8):
            x = torch.from_numpy(rows[s : s + 8].astype(np.int64))
            target = proc(teacher(x[:, :-1]), gammas=(0.5,))
            target.ids = perm[target.ids]  # the map: padding entries (log p = -inf) are ignored by the writer
            for w in writers.values():
                w.write(torch.arange(s, s + len(x)), x, target)
            valid = torch.isfinite(target.logprobs)
            counts.append(valid.sum(-1).numpy())
            ids.append(target.ids[valid].numpy())
            lps.append(target.logprobs[valid].double().numpy())
    for w in writers.values():
        w.finalize()
    counts, ids, lps = np.concatenate(counts), np.concatenate(ids), np.concatenate(lps)
    mask = np.arange(100)[None, :] < counts[:, None]  # (N, 100) the stored entries of each padded row
    out = {}
    for s, w in writers.items():
        cache = TeacherCache(w.path)
        got_ids = np.concatenate([cache[i]["teacher_ids"].numpy() for i in range(n)])[mask]
        got_lp = np.concatenate([cache[i]["teacher_logprobs"].numpy() for i in range(n)])[mask].astype(np.float64)
        assert (got_ids == ids).all(), f"schema {s}: ids not exact"
        info = cache_info(w.path)
        out[f"v{s}_bytes_per_entry_151k"] = info["bytes_per_entry"]
        out[f"v{s}_max_abs_err"] = float(np.abs(got_lp - lps).max())
        print(f"V=151,552 schema {s}: {info['bytes_per_entry']:.4f} B/entry, {info['bytes_per_token']:.1f} B/token, "
              f"max |Δ log p| {out[f'v{s}_max_abs_err']:.3e} over {len(ids):,} entries ({n} sequences)")  # fmt: skip
    starts = np.concatenate([[0], np.cumsum(counts)])
    bounds = [(a, min(a + 2048, len(counts)), int(starts[a]), int(starts[min(a + 2048, len(counts))]))
              for a in range(0, len(counts), 2048)]  # fmt: skip
    meg_bytes, meg_err = megatron_like(counts, ids, (-lps).astype(np.float32), BIG_VOCAB, bounds)
    out["megatron_bytes_per_entry_151k"] = meg_bytes / len(ids)
    out["megatron_max_abs_err"] = float(
        np.abs(lps.astype(np.float16).astype(np.float64) - lps).max()
    )  # fp16 of the fp32 log p
    print(f"V=151,552 Megatron-like (fp16 + 18-bit ids, zstd): {out['megatron_bytes_per_entry_151k']:.4f} B/entry, "
          f"max |Δ log p| {out['megatron_max_abs_err']:.3e}")  # fmt: skip
    out["bytes_per_entry_ratio_v3_v2_151k"] = out["v3_bytes_per_entry_151k"] / out["v2_bytes_per_entry_151k"]
    import shutil

    shutil.rmtree(scratch)
    return out


if __name__ == "__main__":
    main()
