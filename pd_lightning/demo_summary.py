"""Table rows from finished ``pd-lightning fit`` run folders (what ``pd-lightning report --runs`` compares).

    pd-lightning report --runs lm-only=runs/demo/student-lm vanilla-pd=runs/demo/vanilla-pd pd-star=runs/demo/pdstar

The first run is the baseline (Δ% = ``100 · (L_first − L) / L_first``). Each folder is a fit's
``--trainer.default_root_dir``: its newest ``metrics.csv`` (CSVLogger) gives the validation curve, whose last point
is the held-out loss (its last ``val/bpb`` the held-out bits per byte); its ``config.yaml`` gives the seed, the
student and the plug-ins; a ``bench.json`` in it (``pd-lightning validate --eval.output``) gives the benchmark
average. The rows have the shape of ``pd-lightning sweep``'s ``results.jsonl``, so the same table and figures apply.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from pd_lightning.sweep import CACHE_RE, cache_bytes_per_token, describe, last_val_bpb, val_curve

BENCH_FILE = "bench.json"  # a run's benchmark scores (pd-lightning validate --eval.output <run>/bench.json)


def row_from_run(name: str, run_dir: str | Path, baseline: bool = False) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"report: --runs {name}={run_dir}: no such run folder (run its `pd-lightning fit`)")
    configs = sorted(run_dir.rglob("config.yaml"), key=lambda p: p.stat().st_mtime)
    curve = val_curve(run_dir)
    if not configs or not curve:
        raise FileNotFoundError(f"report: --runs {name}={run_dir}: no config.yaml / metrics.csv with val/loss in it")
    config = yaml.safe_load(configs[-1].read_text())
    data = config["data"]["init_args"]
    cache = Path(data.get("path") or "")
    m = CACHE_RE.search(cache.name)
    trainer = config.get("trainer") or {}
    tokens = None
    seq_len = None
    if data.get("val_tokens") and Path(data["val_tokens"]).exists():
        import h5py

        with h5py.File(data["val_tokens"], "r") as f:
            seq_len = int(f.attrs.get("seq_len", 0))
    if seq_len and trainer.get("max_steps"):
        tokens = int(trainer["max_steps"]) * int(data["batch_size"]) * seq_len
    bench = _bench(run_dir, name)
    return {
        "name": name,
        "seed": config.get("seed_everything"),
        "student": (config["model"].get("student") or {}).get("preset"),
        **describe(config),
        "cache": cache.name,
        "p": float(m.group(1)) if m else None,
        "k": int(m.group(2)) if m else None,
        "cache_bytes_per_token": cache_bytes_per_token(cache) if m and not baseline else None,
        "val_loss": curve[-1][1],
        "val_ppl": math.exp(curve[-1][1]),
        "val_bpb": last_val_bpb(run_dir),
        "val_curve": curve,
        "tokens": tokens,
        "bench_average": bench.get("average"),
        "bench_scores": bench.get("scores"),
        "wall_s": 0.0,
        "config_file": str(configs[-1]),
        "baseline": baseline,
    }


def _bench(run_dir: Path, name: str) -> dict:
    """The run's benchmark scores, ``<run>/bench.json`` as ``pd-lightning validate --eval.output`` writes it (the
    demo scores each student on the lm-eval fixtures); {} when the run has none."""
    path = run_dir / BENCH_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"report: --runs {name}={run_dir}: {path} is not a results JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("average"), int | float):
        raise ValueError(f"report: --runs {name}={run_dir}: {path} has no benchmark 'average' (pd-lightning validate)")
    return data


def rows_from_runs(specs: list[str]) -> list[dict]:
    """``NAME=RUN_DIR`` specs -> rows; the first is the baseline."""
    rows = []
    for i, spec in enumerate(specs):
        name, sep, run_dir = spec.partition("=")
        if not sep or not name or not run_dir:
            raise ValueError(f"report: --runs takes NAME=RUN_DIR items, got {spec!r}")
        rows.append(row_from_run(name, run_dir, baseline=i == 0))
    return rows
