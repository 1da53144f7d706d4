"""Benchmark results as the paper reports them: one score per task (in %), their average, and Δ% vs a baseline.

Δ% of a task is the relative change against the baseline's score, ``100 * (score - base) / base`` (the paper's
"Δ relative to the LM-only baseline"); the average's Δ% is the same formula on the two averages.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def delta_pct(score: float, base: float) -> float | None:
    """Relative change in percent: 100 * (score - base) / base (None, "n/a" in the tables, when the baseline is 0:
    the relative change is undefined, and NaN is not valid JSON)."""
    return 100.0 * (score - base) / base if base else None


def load_baseline(path: str | os.PathLike, tasks: list[str] | tuple[str, ...]) -> dict[str, float]:
    """Scores (task -> %) of a baseline results JSON written by ``pd-lightning validate`` (its ``scores``), or a plain
    ``{task: score}`` object. Every task scored now must be in it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--eval.baseline {str(p)!r} does not exist (give a results JSON of `validate`)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--eval.baseline {str(p)!r}: not a JSON file ({e})") from None
    scores = data.get("scores", data) if isinstance(data, dict) else None
    if not isinstance(scores, dict):
        raise ValueError(f"--eval.baseline {str(p)!r}: expected an object with 'scores' {{task: score}}")
    missing = [t for t in tasks if not isinstance(scores.get(t), int | float)]
    if missing:
        raise ValueError(f"--eval.baseline {str(p)!r}: no score for task(s) {', '.join(missing)}")
    return {t: float(scores[t]) for t in tasks}


def with_deltas(scores: dict[str, float], average: float, baseline: dict[str, float] | None) -> dict:
    """``{"scores", "average"}`` plus, given a baseline, ``{"baseline", "baseline_average", "delta_pct"}``; the
    baseline's average is taken over the same tasks."""
    out: dict = {"scores": dict(scores), "average": average}
    if baseline is not None:
        base_avg = sum(baseline[t] for t in scores) / len(scores)
        out["baseline"] = {t: baseline[t] for t in scores}
        out["baseline_average"] = base_avg
        out["delta_pct"] = {t: delta_pct(scores[t], baseline[t]) for t in scores}
        out["delta_pct"]["average"] = delta_pct(average, base_avg)
    return out


def _rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    tasks = list(summary["scores"])
    header = ["", *tasks, "average"]
    rows = [["score", *(f"{summary['scores'][t]:.2f}" for t in tasks), f"{summary['average']:.2f}"]]
    if "delta_pct" in summary:
        base = summary["baseline"]
        rows.append(["baseline", *(f"{base[t]:.2f}" for t in tasks), f"{summary['baseline_average']:.2f}"])
        deltas = [summary["delta_pct"][t] for t in [*tasks, "average"]]
        rows.append(["Δ%", *("n/a" if d is None else f"{d:+.2f}" for d in deltas)])
    return header, rows


def text_table(summary: dict) -> str:
    """Aligned plain-text table: tasks as columns, rows score / baseline / Δ%."""
    header, rows = _rows(summary)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows])


def markdown_table(summary: dict) -> str:
    header, rows = _rows(summary)
    header[0] = "model"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _json_safe(value):
    """NaN / inf (e.g. an lm-eval stderr of one document) -> None, so the file is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_results(summary: dict, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``path`` (JSON) and the markdown table beside it (``.md``), each through a temporary file + rename."""
    json_path = Path(path)
    md_path = json_path.with_suffix(".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(summary), indent=2, default=str, allow_nan=False) + "\n"
    texts = {json_path: text, md_path: markdown_table(summary)}
    for target, text in texts.items():
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    return json_path, md_path
