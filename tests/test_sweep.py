"""`pd-lightning sweep` at a tiny scale: a 2-config sweep (+ the LM-only baseline it adds), the teacher cache it
builds, the results table against the runs' own metrics.csv, resume (finished runs skipped), bad input; then
`pd-lightning report` on the table (figures and the Δ% it prints against a hand computation)."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
import struct
from pathlib import Path

import pytest

from pd_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _last_val_loss(run_dir: Path) -> float:
    """The last val/loss Lightning's CSVLogger wrote (read independently of pd_lightning.sweep)."""
    (metrics,) = run_dir.rglob("metrics.csv")
    with open(metrics, newline="") as f:
        values = [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]
    return values[-1]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def swept(tmp_path_factory, prepared, hf_teacher):
    data = tmp_path_factory.mktemp("sweep_data")
    shutil.copytree(prepared["tokens"].parent, data, dirs_exist_ok=True)
    out = tmp_path_factory.mktemp("sweep") / "alpha"
    argv = [
        "sweep", str(ROOT / "configs/paper/table4-alpha-0.5.yaml"), str(ROOT / "configs/paper/table4-alpha-1.0.yaml"),
        "--scale", "tiny", "--data_dir", str(data), "--teacher", str(hf_teacher), "--output", str(out),
    ]  # fmt: skip
    main(argv)
    return out, data, argv


def test_sweep_runs_each_config_and_the_baseline(swept):
    out, data, _ = swept
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["lm-baseline", "table4-alpha-0.5", "table4-alpha-1.0"]
    assert (data / "cache/top-0.95-100/index.json").exists()  # built from the teacher because it was missing
    for r in rows:
        run_dir = out / "runs" / f"{r['name']}-s1234"
        assert r["val_loss"] == pytest.approx(_last_val_loss(run_dir), abs=1e-6)
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-9)
        assert r["tokens"] == 6 * 2 * 64  # max_steps x batch x seq_len of the tiny scale
        assert r["config"]["model"]["student"]["preset"] == "tiny"
        assert r["cache"] == "top-0.95-100" and r["cache_bytes_per_token"] > 0
        assert [step for step, _ in r["val_curve"]] == [3, 6]  # the optimizer steps the run validated after
    assert [r["alpha"] for r in rows] == ["0.0", "0.5", "1.0"]
    assert [r["loss"] for r in rows] == ["LM only", "NLL", "NLL"]
    with open(out / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [float(t["val_loss"]) for t in table] == pytest.approx([r["val_loss"] for r in rows])


def test_sweep_dry_run_prints_and_writes_nothing(prepared, tmp_path, capsys, monkeypatch):
    """--dry_run: the scale file and every command are printed, a missing cache's predict once; nothing is written."""
    monkeypatch.chdir(ROOT)
    data = tmp_path / "data"
    shutil.copytree(prepared["tokens"].parent, data)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "out"
    main(["sweep", "configs/paper/table4-alpha-0.5.yaml", "configs/paper/table4-alpha-1.0.yaml", "--scale", "tiny",
          "--data_dir", str(data), "--output", str(out), "--teacher", str(tmp_path / "t.ckpt"),
          "--dry_run"])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"# {out / 'scale.yaml'} (not written by --dry_run)" in printed and "max_steps: 6" in printed
    assert printed.count(" predict --config ") == 1 and printed.count(" fit --config ") == 3
    assert "t.ckpt, which does not exist yet)" in printed  # a dry run plans a teacher that is still to be trained
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before and not out.exists()


def test_sweep_skips_finished_runs(swept, capsys):
    out, _, argv = swept
    marks = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    before = (out / "results.jsonl").read_text()
    main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == marks
    assert (out / "results.jsonl").read_text() == before
    assert capsys.readouterr().out.count("already done, skipped") == 3


@pytest.mark.parametrize(
    "extra, named",
    [(["--max_steps", "12"], "trainer.max_steps 6 -> 12"), (["--student", "small"], "--student None -> 'small'"),
     (["--fit_args", "--model.lr 1e-3"], "--fit_args '' -> '--model.lr 1e-3'")],
)  # fmt: skip
def test_sweep_refuses_to_reuse_runs_made_with_other_settings(swept, capsys, extra, named):
    """A rerun into a sweep folder with finished runs but another scale, --student or --fit_args would have reused
    the old runs as if they were the new ones: one line naming what differs, exit 1, nothing written."""
    out, _, argv = swept
    marks = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        main([*argv, *extra])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    said = f"pd-lightning: sweep: {out} holds finished runs made with other settings"
    assert len(err) == 1 and err[0].startswith(said), err
    assert named in err[0], err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == marks


def test_sweep_resumes_an_interrupted_run(swept):
    out, _, argv = swept
    victim = out / "runs" / "table4-alpha-1.0-s1234"
    (victim / "result.json").unlink()  # as if killed before the end: the run is redone, the others are kept
    kept = (out / "runs" / "lm-baseline-s1234" / "result.json").stat().st_mtime_ns
    main(argv)
    assert (victim / "result.json").exists()
    assert (out / "runs" / "lm-baseline-s1234" / "result.json").stat().st_mtime_ns == kept
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


def test_report_draws_figures_and_prints_delta(swept, capsys):
    out, _, _ = swept
    rows = {r["name"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    main(["report", str(out)])
    printed = capsys.readouterr().out
    base = rows["lm-baseline"]["val_loss"]
    for name in ("table4-alpha-0.5", "table4-alpha-1.0"):
        delta = 100.0 * (base - rows[name]["val_loss"]) / base  # hand computation of the paired Δ%
        line = next(x for x in printed.splitlines() if x.startswith(f"| {name} "))
        assert f"{delta:+.2f}" in line
    for png in ("curves.png", "delta_all.png", "alpha.png"):
        w, h = _png_size(out / "report" / png)
        assert w >= 600 and h >= 300
    md = (out / "report" / "report.md").read_text()
    assert "alpha.png" in md and "| lm-baseline |" in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["configs/paper/nope-*.yaml", "--output", "X"], "no YAML matches"),
        (["configs/paper/pd-star.yaml"], "the following arguments are required: --output"),
        (["configs/paper/pd-star.yaml", "--output", "X", "--scale", "huge"], "invalid choice: 'huge'"),
        (["configs/paper/pd-star.yaml", "--output", "X", "--data_dir", "/nonexistent"], "tokens.h5 is missing"),
    ],
)
def test_sweep_bad_input_one_line_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [a.replace("X", str(tmp_path / "out")) for a in args]
    with pytest.raises(SystemExit) as e:
        main(["sweep", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("pd-lightning: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_report_missing_table(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2 and "results.jsonl does not exist" in capsys.readouterr().err


def test_report_runs_compares_fit_folders(swept, tmp_path, capsys):
    """`report --runs` (the demo's last step) on plain fit folders: the first is the baseline."""
    out, _, _ = swept
    runs = {n: out / "runs" / f"{n}-s1234" for n in ("lm-baseline", "table4-alpha-1.0")}
    main(["report", "--runs", f"lm-only={runs['lm-baseline']}", f"kd={runs['table4-alpha-1.0']}",
          "--output", str(tmp_path / "rep")])  # fmt: skip
    printed = capsys.readouterr().out
    base, kd = _last_val_loss(runs["lm-baseline"]), _last_val_loss(runs["table4-alpha-1.0"])
    line = next(x for x in printed.splitlines() if x.startswith("| kd "))
    assert f"{kd:.4f}" in line and f"{100.0 * (base - kd) / base:+.2f}" in line
    assert "| lm-only " in printed and "baseline" in printed
    _png_size(tmp_path / "rep" / "curves.png")
    with pytest.raises(SystemExit) as e:
        main(["report", "--runs", "lm-only", "--output", str(tmp_path / "x")])
    assert e.value.code == 2 and "NAME=RUN_DIR" in capsys.readouterr().err

    # A run folder holding `validate --eval.output <run>/bench.json` (the demo's lm-eval step): its average is shown.
    kd_copy = tmp_path / "kd"
    shutil.copytree(runs["table4-alpha-1.0"], kd_copy)
    (kd_copy / "bench.json").write_text(json.dumps({"scores": {"piqa": 50.0, "hellaswag": 25.0}, "average": 37.5}))
    main(["report", "--runs", f"lm-only={runs['lm-baseline']}", f"kd={kd_copy}", "--output", str(tmp_path / "rep2")])
    printed = capsys.readouterr().out
    assert "bench avg" in printed.splitlines()[0]
    assert "| 37.50 |" in next(x for x in printed.splitlines() if x.startswith("| kd "))
    (kd_copy / "bench.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        main(["report", "--runs", f"lm-only={runs['lm-baseline']}", f"kd={kd_copy}", "--output", str(tmp_path / "x")])
    assert e.value.code == 2 and "bench.json is not a results JSON" in capsys.readouterr().err


def test_sweep_scores_benchmarks_with_validate(swept, tmp_path):
    """--eval_tasks: each finished run is scored by `pd-lightning validate --eval.*`; the row carries its scores."""
    _, data, _ = swept
    out = tmp_path / "bench"
    main(["sweep", str(ROOT / "configs/paper/table4-alpha-1.0.yaml"), "--baseline", "none", "--scale", "tiny",
          "--data_dir", str(data), "--output", str(out), "--eval_tasks", "piqa", "hellaswag",
          "--eval_data", str(ROOT / "tests/fixtures/eval"), "--eval_limit", "2"])  # fmt: skip
    (row,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    bench = json.loads((out / "runs/table4-alpha-1.0-s1234/bench.json").read_text())
    assert set(row["bench"]["scores"]) == {"piqa", "hellaswag"}
    assert row["bench_average"] == pytest.approx(bench["average"])
    assert row["bench_average"] == pytest.approx(statistics.fmean(bench["scores"].values()))
    with open(out / "results.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["bench_average"]) == pytest.approx(bench["average"])


@pytest.mark.parametrize(
    "signame, code, said", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "stopped by SIGTERM")]
)
def test_sweep_interrupted_says_so_in_one_line_and_stops_its_fits(swept, tmp_path, signame, code, said):
    """Ctrl-C (SIGINT to the sweep process only) or ``kill`` (SIGTERM) while two fits run: both are stopped, one line
    and exit 130 / 143, and the interrupted runs have no result.json (so the rerun redoes them; skipping finished runs
    is tested above). The sweep starts with SIGINT at its default: a shell without job control starts background
    commands with SIGINT ignored, and Python then installs no Ctrl-C handler (the sweep would rightly run on)."""
    import signal
    import subprocess
    import sys
    import time

    _, data, _ = swept
    out = tmp_path / "s"
    argv = [sys.executable, "-m", "pd_lightning.cli", "sweep", str(ROOT / "configs/paper/table4-alpha-0.5.yaml"),
            str(ROOT / "configs/paper/table4-alpha-1.0.yaml"), "--scale", "tiny", "--data_dir", str(data),
            "--output", str(out), "--jobs", "2", "--max_steps", "200"]  # fmt: skip
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)  # fmt: skip
    deadline = time.monotonic() + 120
    while not list((out / "runs").glob("*/fit.log")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # the fits are running
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1].startswith(f"pd-lightning: sweep {said}; finished runs are kept")
    assert "Traceback" not in err
    assert not (out / "runs" / "table4-alpha-1.0-s1234" / "result.json").exists()
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a fit of the interrupted sweep is still running"


# ---- issue items 11 and 18: bad input in one line (exit 2), whole lines from runs side by side ----------------------
@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("model:\n  lr: [1, 2\n", "not valid YAML at line 3, column 1"),
        ("- model\n- data\n", "expected a mapping of keys"),
        ("writer:\n  output: x\nmodel:\n  teacher: t.ckpt\n", "is a `pd-lightning predict` config (it has writer:)"),
    ],
)
def test_sweep_bad_config_is_one_line_exit_2(tmp_path, capsys, text, said):
    """A malformed YAML printed a 64-line traceback (exit 1); a predict YAML failed as a run (exit 1)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    (tmp_path / "tokens.h5").write_text("")  # the data is there: the config is what is wrong
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(bad), "--output", str(tmp_path / "out"), "--data_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith(f"pd-lightning: error: sweep: config {str(bad)!r}"), err
    assert said in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "cause"),
    [
        (["--student", "huge"], "unknown preset 'huge' (--model.student.preset)"),
        (["--fit_args", "--trainer.max_steps abc"], "--trainer.max_steps: expected a int, got 'abc'"),
    ],
)
def test_sweep_run_refusing_its_input_prints_the_cause_exit_2(swept, tmp_path, capsys, extra, cause):
    """Was: exit 1 and "run … failed (exit 2); see …/fit.log"; now the run's own one-line cause, exit 2."""
    _, data, _ = swept
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(ROOT / "configs/paper/table4-alpha-0.5.yaml"), "--scale", "tiny", "--baseline", "none",
              "--data_dir", str(data), "--output", str(out), *extra])  # fmt: skip
    err = [s for s in capsys.readouterr().err.splitlines() if s.strip()]
    assert e.value.code == 2 and len(err) == 1, err
    log = out / "runs" / "table4-alpha-0.5-s1234" / "fit.log"
    assert err[0].startswith(f"pd-lightning: error: sweep: run table4-alpha-0.5 seed 1234: {cause}"), err[0]
    assert err[0].endswith(f" (log: {log})"), err[0]


class _SlowTerminal:
    """stdout that gives the other threads a turn inside every write, as a slow terminal or pipe does."""

    def __init__(self) -> None:
        self.chunks: list[str] = []

    def write(self, text: str) -> int:
        import time

        self.chunks.append(text)
        time.sleep(0.001)
        return len(text)

    def flush(self) -> None:
        pass


def test_sweep_jobs_2_prints_whole_lines(tmp_path, monkeypatch):
    """Item 18: with --jobs 2 the "already done" lines of two threads ran together (print writes the text and the
    newline separately)."""
    import re
    import sys

    data = tmp_path / "data"
    (data / "cache" / "top-0.95-100").mkdir(parents=True)
    (data / "cache" / "top-0.95-100" / "index.json").write_text("{}")
    (data / "tokens.h5").write_text("")
    out = tmp_path / "out"
    configs = []
    for i in range(12):
        configs.append(tmp_path / f"exp{i:02d}.yaml")
        configs[-1].write_text("model:\n  lr: 0.001\n")
        for seed in (1, 2):
            run = out / "runs" / f"exp{i:02d}-s{seed}"
            run.mkdir(parents=True)
            (run / "result.json").write_text(json.dumps({"name": f"exp{i:02d}", "seed": seed, "val_loss": 1.5}))
    terminal = _SlowTerminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    main(["sweep", *map(str, configs), "--scale", "tiny", "--baseline", "none", "--data_dir", str(data),
          "--output", str(out), "--seeds", "1", "2", "--jobs", "2"])  # fmt: skip
    monkeypatch.undo()
    lines = "".join(terminal.chunks).splitlines()
    done = re.compile(r"sweep \[\d+/24\] exp\d\d seed [12]: val/loss 1\.5000 \(already done, skipped\)")
    assert sum(bool(done.fullmatch(s)) for s in lines) == 24, lines
    assert all(done.fullmatch(s) or s.startswith("sweep: 24 runs") for s in lines), lines
