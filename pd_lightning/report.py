"""``pd-lightning report RESULTS``: the paper's figures and tables from a sweep's results table.

    pd-lightning report runs/sweeps/alpha            # the sweep folder (or its results.jsonl)

Δ% of a run = ``100 · (L_lm − L) / L_lm``: its held-out LM loss ``L`` against the LM-only baseline's ``L_lm`` of
the same student and seed (paired), positive = better than LM-only, as the paper's ↑. Where the runs logged
``val/bpb`` (held-out bits per byte, which compares students with different tokenizers) the table shows its mean and
the paired Δ% of bits per byte too. Over seeds: the mean and the
sample standard deviation of the paired Δ%. The paper's Δ% is on its benchmark average (GLM students, 100B
tokens); ours is on held-out loss at a small scale, so the two are compared by direction, not size.

Writes into ``<sweep>/report/`` (or ``--output``): ``report.md`` (one table of every config + the figures drawn)
and the PNGs that the runs allow (a figure needs two or more configs of its family):

- ``curves.png``      validation loss against optimizer step, one line per config (mean over seeds);
- ``delta_all.png``   Δ% of every config (bars, ±1 std over seeds);
- ``tau.png``         Δ% against τ (Table 2 / Table 9);       ``adaptive_tau.png``  adaptive τ methods (Table 3);
- ``alpha.png``       Δ% against α (Table 4);                  ``loss_schedule.png`` loss and α/LR schedule (Table 5);
- ``top_p.png``, ``top_k.png``  Δ% against p and k of top-p-k (Figures 2, 3 / Table 8);
- ``cache_bytes.png`` cache bytes per token against p and k (Figures 2, 3, right axes);
- ``student_size.png`` Δ% against student size (Figure 4), when the sweep ran several student presets.
Each figure also shows the paper's Δ% (benchmark average) where the paper reports that config.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path

# The paper's Δ% over LLM-LM (benchmark average) per configs/paper/ row: Tables 2, 3, 4, 5, 8 (Table 8 from its
# averages against LLM-LM's 37.7).
_T8 = {"0.5-100": 38.5, "0.6-100": 38.3, "0.7-100": 38.5, "0.8-100": 38.4, "0.85-100": 38.2, "0.9-100": 38.2,
       "0.95-1": 38.4, "0.95-3": 38.1, "0.95-5": 38.7, "0.95-10": 38.5, "0.95-20": 38.2, "0.95-50": 39.6,
       "0.95-100": 38.3}  # fmt: skip
PAPER_DELTA = {
    **{f"table2-tau-{t}": d for t, d in [("0.05", 1.6), ("0.1", 2.1), ("0.2", 2.5), ("0.5", 2.7), ("1.0", 1.6),
                                          ("2.0", 2.5), ("5.0", -0.1), ("10.0", 1.0)]},
    "table3-normkd": -1.3, "table3-wttm": 0.2, "table3-adakd-sd": 1.2, "table3-adakd-h": 2.8,
    **{f"table4-alpha-{a}": d for a, d in [("0.1", 0.1), ("0.5", 1.5), ("0.6", 1.4), ("0.7", 2.9), ("0.8", 2.0),
                                            ("0.9", 3.6), ("0.95", 2.5), ("1.0", 1.6)]},
    "table5-lm-wsd-lr": 1.2, "table5-nll": 1.6, "table5-kld": 2.6, "table5-mse": -7.6, "table5-linear-inc": 1.1,
    "table5-linear-dec": 4.1, "table5-period": 0.9, "table5-1-alpha-wsd-lr": 5.0, "table5-wsd-alpha-cos-lr": 2.3,
    "table5-wsd-beta-wsd-lr": 1.1, "table5-wsd-alpha-wsd-lr": 8.0, "vanilla-pd": 1.6, "pd-star": 8.0,
    "student_vanilla_pd": 1.6, "student_pdstar": 8.0,  # the demo's configs (make demo-seeds)
    **{f"table8-top-{pk}": round(100 * (avg - 37.7) / 37.7, 1) for pk, avg in _T8.items()},
}  # fmt: skip
BASELINE_NAMES = ("lm-baseline",)
LABELS = {  # the paper's names of the configs/paper/ rows (Tables 3 and 5)
    "lm-baseline": "LM only (cosine LR)", "vanilla-pd": "vanilla PD", "pd-star": "PD*",
    "table5-lm-wsd-lr": "0-α + WSD-LR", "table5-nll": "NLL", "table5-kld": "KLD", "table5-mse": "MSE",
    "table5-linear-inc": "Linear Inc α", "table5-linear-dec": "Linear Dec α", "table5-period": "Period α",
    "table5-1-alpha-wsd-lr": "1-α + WSD-LR", "table5-wsd-alpha-cos-lr": "WSD-α + Cos-LR",
    "table5-wsd-beta-wsd-lr": "WSD-β + WSD-LR", "table5-wsd-alpha-wsd-lr": "WSD-α + WSD-LR",
    "table3-normkd": "NormKD", "table3-wttm": "WTTM", "table3-adakd-sd": "AdaKD-sD", "table3-adakd-h": "AdaKD-H",
    "student_lm": "LM only", "student_vanilla_pd": "vanilla PD", "student_pdstar": "PD*",
}  # fmt: skip
FAMILIES = [  # (file, name pattern, x label, x from the match, log x, title)
    ("tau.png", r"^table2-tau-([0-9.]+)$", "temperature τ (static)", float, True, "Δ% over LM-only against τ"),
    ("alpha.png", r"^table4-alpha-([0-9.]+)$", "α (constant)", float, False, "Δ% over LM-only against α"),
    ("top_p.png", r"^table8-top-([0-9.]+)-100$", "p in top-p-100", float, False, "Δ% over LM-only against p"),
    ("top_k.png", r"^table8-top-0\.95-([0-9]+)$", "k in top-0.95-k", int, True, "Δ% over LM-only against k"),
]
BAR_FAMILIES = [
    ("loss_schedule.png", r"^(table5-.*|vanilla-pd|pd-star)$", "Loss and schedule (Table 5): Δ% over LM-only"),
    ("adaptive_tau.png", r"^table3-.*$", "Adaptive temperature (Table 3): Δ% over LM-only"),
]


def load_rows(results: str | Path) -> tuple[list[dict], Path]:
    """Rows of a sweep's ``results.jsonl`` (the path, or the sweep folder holding it)."""
    path = Path(results)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"report: {path} does not exist; give a sweep folder or its results.jsonl")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"report: {path} line {n} is not JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"report: {path} holds no runs")
    return rows, path.parent


def is_baseline(row: dict) -> bool:
    """The LM-only run the others are compared with (the sweep marks it; ``lm-baseline`` by name otherwise)."""
    return bool(row.get("baseline")) if "baseline" in row else row["name"] in BASELINE_NAMES


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per config: mean held-out loss, Δ% (paired with the baseline of the same student and seed), and the
    same two for bits per byte where the runs logged it."""
    base = {(r.get("student"), r["seed"]): r["val_loss"] for r in rows if is_baseline(r)}
    base_bpb = {(r.get("student"), r["seed"]): r["val_bpb"] for r in rows if is_baseline(r) and r.get("val_bpb")}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["name"], r.get("student"))].append(r)
    out = []
    for (name, student), rs in groups.items():
        deltas = [
            100.0 * (base[(student, r["seed"])] - r["val_loss"]) / base[(student, r["seed"])]
            for r in rs
            if (student, r["seed"]) in base
        ]
        losses = [r["val_loss"] for r in rs]
        bpbs = [r["val_bpb"] for r in rs if r.get("val_bpb") is not None]
        deltas_bpb = [
            100.0 * (base_bpb[(student, r["seed"])] - r["val_bpb"]) / base_bpb[(student, r["seed"])]
            for r in rs
            if (student, r["seed"]) in base_bpb and r.get("val_bpb") is not None
        ]
        bench = [r["bench_average"] for r in rs if r.get("bench_average") is not None]
        first = rs[0]
        out.append(
            {
                **{k: first.get(k) for k in ("name", "student", "loss", "tau", "alpha", "lr_schedule", "p", "k")},
                "baseline": is_baseline(first),
                "seeds": sorted(r["seed"] for r in rs),
                "val_loss": statistics.fmean(losses),
                "val_ppl": math.exp(statistics.fmean(losses)),
                "delta": statistics.fmean(deltas) if deltas else None,
                "delta_std": statistics.stdev(deltas) if len(deltas) > 1 else None,
                "val_bpb": statistics.fmean(bpbs) if bpbs else None,
                "delta_bpb": statistics.fmean(deltas_bpb) if deltas_bpb else None,
                "bench_average": statistics.fmean(bench) if bench else None,
                "cache_bytes_per_token": None if first.get("loss") == "LM only" else first.get("cache_bytes_per_token"),
                "tokens": first.get("tokens"),
                "wall_s": statistics.fmean(r.get("wall_s", 0.0) for r in rs),
                "paper_delta": PAPER_DELTA.get(name),
                "curves": [r.get("val_curve") or [] for r in rs],
            }
        )
    return sorted(out, key=lambda s: (not is_baseline(s), s["student"] or ""))  # else in the runs' order


def _fmt(x, spec: str = ".4f") -> str:
    return "" if x is None else format(x, spec)


def markdown_table(summary: list[dict]) -> str:
    """The table of every config: held-out loss/ppl, Δ% over LM-only (± std over seeds), held-out bits per byte and
    its Δ%, the paper's Δ%, benchmark average, cache bytes/token, tokens, wall time; a column empty for every config
    is left out."""
    columns = [
        ("config", lambda s: s["name"]),
        ("student", lambda s: s["student"] or ""),
        ("seeds", lambda s: str(len(s["seeds"]))),
        ("held-out loss", lambda s: f"{s['val_loss']:.4f}"),
        ("ppl", lambda s: f"{s['val_ppl']:.1f}"),
        ("Δ% vs LM-only", lambda s: "baseline" if s["baseline"] else _fmt(s["delta"], "+.2f")),
        ("± std", lambda s: "" if s["baseline"] else _fmt(s["delta_std"], ".2f")),
        ("bits/byte", lambda s: _fmt(s.get("val_bpb"), ".4f")),
        ("Δ% bits/byte", lambda s: "" if s["baseline"] else _fmt(s.get("delta_bpb"), "+.2f")),
        ("paper Δ%", lambda s: _fmt(s["paper_delta"], "+.1f")),
        ("bench avg %", lambda s: _fmt(s["bench_average"], ".2f")),
        ("cache B/token", lambda s: _fmt(s["cache_bytes_per_token"], ".1f")),
        ("tokens", lambda s: f"{s['tokens']:,}" if s["tokens"] else ""),
        ("wall s", lambda s: f"{s['wall_s']:.0f}" if s["wall_s"] else ""),
    ]
    cells = [[fn(s) for _, fn in columns] for s in summary]
    keep = [i for i in range(len(columns)) if any(row[i] for row in cells)]
    lines = ["| " + " | ".join(columns[i][0] for i in keep) + " |", "|" + "---|" * len(keep)]
    lines += ["| " + " | ".join(row[i] for i in keep) + " |" for row in cells]
    return "\n".join(lines) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _footnote(fig, summary) -> None:
    seeds = max(len(s["seeds"]) for s in summary)
    tokens = summary[0].get("tokens") or 0
    fig.text(
        0.01, -0.01,
        f"ours: held-out LM loss, student {summary[0]['student']}, {tokens:,} training tokens, {seeds} seed(s)\n"
        "paper: benchmark average, GLM students, 100B tokens",
        fontsize=8, color="0.35", va="top",
    )  # fmt: skip


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


_SWEPT_LABELS = [  # the rows of a swept family, by their value
    (r"^table2-tau-([0-9.]+)$", "τ = {}"), (r"^table4-alpha-([0-9.]+)$", "α = {}"),
    (r"^table8-top-([0-9.]+-[0-9]+)$", "top-{}"),
]  # fmt: skip


def _label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    for pattern, form in _SWEPT_LABELS:
        m = re.match(pattern, name)
        if m:
            return form.format(m.group(1))
    return name


def _line_figure(summary, file, pattern, xlabel, conv, logx, title, out: Path) -> Path | None:
    pts = []
    for s in summary:
        m = re.match(pattern, s["name"])
        if m and s["delta"] is not None:
            pts.append((conv(m.group(1)), s))
    if len(pts) < 2:
        return None
    pts.sort(key=lambda t: t[0])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [x for x, _ in pts]
    spread = [s["delta_std"] or 0 for _, s in pts] if any(s["delta_std"] for _, s in pts) else None
    ax.errorbar(xs, [s["delta"] for _, s in pts], yerr=spread, marker="o", capsize=3,
                label="ours (held-out loss)")  # fmt: skip
    paper = [(x, s["paper_delta"]) for x, s in pts if s["paper_delta"] is not None]
    if paper:
        ax.plot(*zip(*paper), marker="s", ls="--", color="0.5", label="paper (benchmark average)")
    ax.axhline(0, color="k", lw=0.8)
    if logx:
        ax.set_xscale("log")
    crowded = not logx and min((b - a for a, b in zip(xs, xs[1:])), default=1) < 0.06 * (xs[-1] - xs[0])
    ax.set_xticks(xs, [f"{x:g}" for x in xs], rotation=45 if crowded else 0)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("Δ% over LM-only (higher is better)")
    ax.set_title(title)
    ax.legend()
    _footnote(fig, summary)
    fig.tight_layout()
    return _save(fig, out / file)


def _bar_figure(summary, file, pattern, title, out: Path) -> Path | None:
    items = [s for s in summary if re.match(pattern, s["name"]) and s["delta"] is not None and not s["baseline"]]
    if len(items) < 2:
        return None
    items.sort(key=lambda s: s["delta"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(items) + 1.8))
    ys = range(len(items))
    paper = any(s["paper_delta"] is not None for s in items)
    spread = [s["delta_std"] or 0 for s in items] if any(s["delta_std"] for s in items) else None  # one seed: none
    ax.barh([y + 0.2 if paper else y for y in ys], [s["delta"] for s in items], height=0.4 if paper else 0.6,
            xerr=spread, capsize=3, label="ours (held-out loss)")  # fmt: skip
    if paper:  # the paper's bar only where the paper reports the config
        ax.barh([y - 0.2 for y in ys], [s["paper_delta"] or 0 for s in items], height=0.4, color="0.7",
                label="paper (benchmark average)")  # fmt: skip
    ax.set_yticks(list(ys), [_label(s["name"]) for s in items])
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("Δ% over LM-only (higher is better)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1 - 0.5 / len(items)), ncol=2, fontsize=9)
    _footnote(fig, summary)
    fig.tight_layout()
    return _save(fig, out / file)


def _curves_figure(summary, out: Path) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = 0
    shown = summary
    if len(summary) > 8:  # baseline + the 4 best and 3 worst final losses: a readable legend
        rest = sorted((s for s in summary if not is_baseline(s)), key=lambda s: s["val_loss"])
        shown = [s for s in summary if is_baseline(s)] + rest[:4] + rest[-3:]
        ax.set_title("Validation loss: LM-only, the 4 best and 3 worst configs (final value in brackets)", fontsize=10)
    for s in shown:
        curves = [c for c in s["curves"] if c]
        if not curves:
            continue
        steps = [p[0] for p in curves[0]]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        label = f"{_label(s['name'])} ({mean[-1]:.3f})" + (f", {len(curves)} seeds" if len(curves) > 1 else "")
        ax.plot(steps[:n], mean, marker="o", label=label, lw=2.2 if is_baseline(s) else 1.5)
        drawn += 1
    if drawn == 0:
        plt.close(fig)
        return None
    steps = sorted({p[0] for s in shown for c in s["curves"] for p in c})
    if 0 < len(steps) <= 12:  # the validation steps themselves
        ax.set_xticks(steps, [str(x) for x in steps], rotation=45 if len(steps) > 8 else 0)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("held-out LM loss (nats/token)")
    if len(summary) <= 8:
        ax.set_title("Validation loss during training (final value in brackets)")
    if drawn > 4:  # beside the axes: inside, a long legend hides curves
        fig.set_size_inches(10, 4.5)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "curves.png")


def _cache_figure(summary, out: Path) -> Path | None:
    by_cache = {(s["p"], s["k"]): s["cache_bytes_per_token"] for s in summary if s.get("cache_bytes_per_token")}
    vs_p = sorted((p, b) for (p, k), b in by_cache.items() if k == 100)
    vs_k = sorted((k, b) for (p, k), b in by_cache.items() if p == 0.95)
    if len(vs_p) < 2 and len(vs_k) < 2:
        return None
    plt = _plt()
    panels = [(pts, xl) for pts, xl in ((vs_p, "p in top-p-100"), (vs_k, "k in top-0.95-k")) if len(pts) >= 2]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 0.5, 4.2), sharey=True, squeeze=False)
    for ax, (pts, xl) in zip(axes[0], panels):  # a panel only for a family with two or more caches
        ax.plot(*zip(*pts), marker="o")
        ax.set_xlabel(xl)
        if xl.startswith("k"):
            ax.set_xscale("log")
            ax.set_xticks([k for k, _ in pts], [str(k) for k, _ in pts])
            ax.minorticks_off()
    axes[0][0].set_ylabel("cache bytes per token")
    varied = " and ".join(xl.split()[0] for _, xl in panels)  # "p", "k" or "p and k"
    fig.suptitle(f"Cache size grows with {varied} (logits stored per token)")
    fig.tight_layout()
    return _save(fig, out / "cache_bytes.png")


def _student_figure(summary, out: Path) -> Path | None:
    from pd_lightning.model.config import PRESET_NAMES

    students = {s["student"] for s in summary}
    if len(students) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = sorted(students, key=lambda p: PRESET_NAMES.index(p) if p in PRESET_NAMES else 99)
    for name in sorted({s["name"] for s in summary if not is_baseline(s)}):
        pts = [(order.index(s["student"]), s["delta"]) for s in summary if s["name"] == name and s["delta"] is not None]
        if pts:
            ax.plot(*zip(*sorted(pts)), marker="o", label=name)
    ax.set_xticks(range(len(order)), order)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("student preset (smaller → larger)")
    ax.set_ylabel("Δ% over LM-only (higher is better)")
    ax.set_title("Δ% over LM-only against student size")
    ax.legend(fontsize=9)
    fig.tight_layout()
    return _save(fig, out / "student_size.png")


def report(results: str | None, output: str | None = None, runs: list[str] | None = None) -> list[Path]:
    """Draw every figure the sweep's runs allow and write ``report.md``; print the table. Returns the files.

    ``runs`` (``NAME=RUN_DIR`` items, the first the baseline) compares fit run folders instead of a sweep table."""
    if runs:
        from pd_lightning.demo_summary import rows_from_runs

        if not output:
            raise ValueError("report: --runs needs --output (the folder for report.md and the figures)")
        rows, sweep_dir = rows_from_runs(runs), Path(output)
    else:
        rows, sweep_dir = load_rows(results)
    out = Path(output) if output else sweep_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    figures = [_curves_figure(summary, out)]
    figures.append(_bar_figure(summary, "delta_all.png", r".*", "Every config: Δ% over LM-only", out))
    figures += [_line_figure(summary, f, p, xl, c, lg, t, out) for f, p, xl, c, lg, t in FAMILIES]
    every = {s["name"] for s in summary if not s["baseline"]}
    figures += [
        _bar_figure(summary, f, p, t, out)
        for f, p, t in BAR_FAMILIES
        if {s["name"] for s in summary if re.match(p, s["name"]) and not s["baseline"]} != every  # else = delta_all
    ]
    figures += [_cache_figure(summary, out), _student_figure(summary, out)]
    figures = [f for f in figures if f is not None]
    table = markdown_table(summary)
    md = out / "report.md"
    md.write_text(
        f"# Report: {sweep_dir}\n\nΔ% = 100·(L_lm − L)/L_lm on held-out LM loss, paired with the LM-only run of "
        "the same student and seed (positive = better). Paper Δ% = the paper's benchmark-average improvement.\n\n"
        + table
        + "\n"
        + "".join(f"![{f.stem}]({f.name})\n" for f in figures)
    )
    print(table, end="")
    print(f"report: {md} and {len(figures)} figure(s) in {out}")
    return [md, *figures]


def main(argv: list[str]) -> list[Path]:
    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:
            raise ValueError(f"report: {message} (pd-lightning report --help)")

    p = _Parser(prog="pd-lightning report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", help="a sweep folder (pd-lightning sweep --output) or its results.jsonl")
    p.add_argument("--output", default=None, help="folder for report.md and the PNGs (default <sweep>/report)")
    p.add_argument("--runs", nargs="+", default=None, help="NAME=RUN_DIR fit folders to compare; the first is LM-only")
    args = p.parse_args(argv)
    if (args.results is None) == (args.runs is None):
        raise ValueError("report: give a sweep folder (RESULTS) or --runs NAME=RUN_DIR ..., one of the two")
    return report(args.results, args.output, args.runs)
