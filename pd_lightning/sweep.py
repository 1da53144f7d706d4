"""``pd-lightning sweep``: run a set of experiment YAMLs at one small scale, one results table.

    pd-lightning sweep configs/paper/table4-*.yaml --scale demo --output runs/sweeps/alpha [--seeds 1 2 3]

Each config (a folder = every ``*.yaml`` in it, or files/globs) is one row of the design space, e.g. a
``configs/paper/`` file that sets the four plug-ins (loss, temperature, alpha, LR schedule) and the cache it reads
(``data.init_args.path: .../top-P-K``). The scale supplies the rest: a base YAML written to ``<output>/scale.yaml``
(student preset, batch, steps, validation set) and the data: the token file, the teacher and one cache folder per
``top-P-K`` under ``<data_dir>/cache/``, built with ``pd-lightning predict`` when missing. An LM-only baseline
(``lm-baseline.yaml`` beside the configs, unless ``--baseline none``) is added so the report can give Δ%.

Every run is a clean ``pd-lightning fit`` subprocess in ``<output>/runs/<name>-s<seed>/`` (its ``config.yaml``,
``metrics.csv``, checkpoint). A run whose ``result.json`` exists is skipped, so a killed sweep resumes with the run
that was interrupted (restarted from its start: its partial folder is removed). After each run the table is
rewritten: ``<output>/results.jsonl`` (one object per run, the resolved config included) and ``results.csv``
(name, seed, student, loss, tau, alpha, LR schedule, p, k, cache bytes/token, held-out loss/ppl, benchmark average,
tokens, wall time).
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CACHE_RE = re.compile(r"top-([0-9.]+)-([0-9]+)$")


@dataclass
class Scale:
    """A small scale the paper's rows run at: the student and the training budget (steps x batch x seq_len)."""

    student: str
    max_steps: int
    batch_size: int
    val_sequences: int | None  # None = the whole validation split
    evals: int = 4  # validation runs per training run (the curve's points)
    lr: float = 3.0e-3
    extra: dict = field(default_factory=dict)


# "demo": the student of `make demo` on the embedded corpus; "tiny": seconds per run (tests, smoke checks).
SCALES = {
    "demo": Scale(student="tiny", max_steps=300, batch_size=8, val_sequences=None),
    "tiny": Scale(student="tiny", max_steps=6, batch_size=2, val_sequences=2, evals=2),
}
CSV_FIELDS = [
    "name", "seed", "student", "loss", "tau", "alpha", "lr_schedule", "cache", "p", "k", "cache_bytes_per_token",
    "val_loss", "val_ppl", "val_bpb", "bench_average", "tokens", "wall_s", "config_file",
]  # fmt: skip


class SweepError(RuntimeError):
    """A run or a cache build failed: one line naming its log, exit 1."""


class RunInputError(ValueError):
    """A run or a cache build refused its input (its ``pd-lightning`` exited 2): cli.main prints the cause, which
    the run's log holds in its ``pd-lightning: error:`` line, in one line, exit 2."""


_SAY = threading.Lock()


def say(line: str, file=None) -> None:
    """Print one whole line: runs side by side (``--jobs``) print from threads, and ``print`` writes the text and
    the newline separately, so two lines could run together."""
    stream = sys.stdout if file is None else file
    with _SAY:
        stream.write(line + "\n")
        stream.flush()


def _cause(log: Path) -> str | None:
    """The last ``pd-lightning: error:`` line of the last command in ``log``, without that prefix."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    last = text.rfind("\n$ ")
    lines = text[last + 1 if last >= 0 else 0 :].splitlines()
    errors = [s.split("pd-lightning: error:", 1)[1].strip() for s in lines if "pd-lightning: error:" in s]
    return errors[-1] if errors else None


def _failed(what: str, rc: int, log: Path) -> Exception:
    """The error for a subprocess that exited ``rc``: its own one-line cause, exit 2, when it refused its input."""
    cause = _cause(log)
    if rc == 2 and cause:
        return RunInputError(f"sweep: {what}: {cause} (log: {log})")
    return SweepError(f"sweep: {what} failed (exit {rc}){': ' + cause if cause else ''}; see {log}")


def load_config(path: Path) -> dict:
    """An experiment YAML as a mapping; one line naming the file (and line) when it cannot be one."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"sweep: config {str(path)!r}: not a UTF-8 text file (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"sweep: config {str(path)!r}: not valid YAML{where}: {problem}") from None
    except OSError as e:
        raise ValueError(f"sweep: config {str(path)!r}: cannot be read ({e.strerror or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"sweep: config {str(path)!r}: expected a mapping of keys (model:, data:, trainer:), "
            f"got a {type(data).__name__}"
        )
    if "writer" in data:  # predict's cache writer: no fit config has one
        raise ValueError(
            f"sweep: config {str(path)!r} is a `pd-lightning predict` config (it has writer:), not an experiment: "
            "give `fit` configs such as configs/paper/*.yaml"
        )
    return data


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (cli.main turns ValueError into that)
        raise ValueError(f"sweep: {message} (pd-lightning sweep --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pd-lightning sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="+", help="experiment YAMLs: files, globs or folders (every *.yaml in it)")
    p.add_argument("--output", required=True, help="sweep folder: runs/, results.jsonl, results.csv")
    p.add_argument(
        "--scale",
        default="demo",
        choices=[*sorted(SCALES), "none"],
        help="student and budget (default demo); none: the configs are complete (e.g. configs/demo/student_*.yaml)",
    )
    p.add_argument("--data_dir", default="data/demo", help="holds tokens.h5 and cache/top-P-K/ (default data/demo)")
    p.add_argument("--teacher", default="runs/demo/teacher/teacher.ckpt", help="teacher for missing caches")
    p.add_argument("--seeds", type=int, nargs="+", default=[1234], help="--seed_everything values (weights+order)")
    p.add_argument("--max_steps", type=int, default=None, help="override the scale's optimizer steps")
    p.add_argument("--student", default=None, help="override the scale's student preset (e.g. demo, tiny)")
    p.add_argument("--val_sequences", type=int, default=None, help="override the scale's validation sequences")
    p.add_argument("--baseline", default=None, help="LM-only YAML added to the runs ('none': no baseline)")
    p.add_argument("--eval_tasks", nargs="*", default=None, help="also score each run's checkpoint on these tasks")
    p.add_argument("--eval_data", default=None, help="task data folder for --eval_tasks (pd-lightning eval-data)")
    p.add_argument("--eval_limit", type=int, default=None, help="documents per task for --eval_tasks")
    p.add_argument("--fit_args", default="", help="extra flags for every fit, one string")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (default 1; each its own process)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return p


def expand_configs(specs: list[str]) -> list[Path]:
    """Files, globs and folders -> the YAML files, in order, without repeats."""
    out: list[Path] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(Path(spec).glob("*.yaml"))
        elif any(c in spec for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(spec))
        else:
            found = [Path(spec)]
        if not found:
            raise FileNotFoundError(f"sweep: no YAML matches {spec!r}; give config files, a glob or a folder")
        for path in found:
            if not path.is_file():
                raise FileNotFoundError(f"sweep: config {path} does not exist")
            if path not in out:
                out.append(path)
    return out


def cache_name(config: Path) -> str:
    """The ``top-P-K`` cache a row reads (its ``data.init_args.path`` basename); top-0.95-100 when it names none."""
    cfg = load_config(config)
    path = ((cfg.get("data") or {}).get("init_args") or {}).get("path")
    if path and CACHE_RE.search(Path(path).name):
        return Path(path).name
    return "top-0.95-100"


def scale_yaml(scale: Scale, tokens: str) -> dict:
    """The base config of every run at this scale (the row's YAML is layered on it)."""
    every = max(1, scale.max_steps // scale.evals)
    divisors = [d for d in range(every, max(1, every // 2) - 1, -1) if scale.max_steps % d == 0]
    every = divisors[0] if divisors else every  # so the last validation falls on the last step when it can
    return {
        "model": {"student": {"preset": scale.student}, "lr": scale.lr},
        "data": {
            "class_path": "pd_lightning.cache.datamodule.CacheDataModule",
            "init_args": {"val_tokens": tokens, "batch_size": scale.batch_size, "val_sequences": scale.val_sequences},
        },
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": scale.max_steps,
            "val_check_interval": every,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": max(1, min(10, every)),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            **scale.extra,
        },
    }


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of the newest ``metrics.csv`` (Lightning's CSVLogger) under ``run_dir``, values as floats."""
    files = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    with open(files[-1], newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]


def val_curve(run_dir: str | os.PathLike) -> list[tuple[int, float]]:
    """``(optimizer step, val/loss)`` of every validation run, in order. Lightning's CSV ``step`` column counts from
    0 (a validation after 50 optimizer steps is logged at step 49), so 1 is added: the step the run printed."""
    return [(int(r["step"]) + 1, r["val/loss"]) for r in read_metrics(run_dir) if "val/loss" in r]


def last_val_bpb(run_dir: str | os.PathLike) -> float | None:
    """The last ``val/bpb`` (bits per byte, ``pd_lightning.crosstok.bytes``) the run logged, or ``None`` (a run whose
    data names no tokenizer, or one from before val/bpb was logged)."""
    values = [r["val/bpb"] for r in read_metrics(run_dir) if "val/bpb" in r]
    return values[-1] if values else None


def _plugin(cfg: dict, key: str) -> tuple[str | None, dict]:
    value = (cfg.get("model") or {}).get(key)
    if not value:
        return None, {}
    return value["class_path"].rsplit(".", 1)[-1], value.get("init_args") or {}


def describe(config: dict) -> dict:
    """Table columns from a run's resolved config: loss class, tau, alpha schedule, LR schedule."""
    loss, _ = _plugin(config, "loss")
    temp, t_args = _plugin(config, "temperature")
    alpha, a_args = _plugin(config, "alpha")
    lr, _ = _plugin(config, "lr_schedule")
    if alpha == "Constant":
        alpha_text = f"{a_args.get('alpha')}"
    elif alpha:
        alpha_text = f"{alpha}(max {a_args.get('alpha_max', '')})" if "alpha_max" in a_args else alpha
    else:
        alpha_text = "0.0"
    tau = t_args.get("tau") if temp == "StaticTemperature" else temp
    is_lm = alpha_text in ("0.0", "0") or loss is None
    return {"loss": "LM only" if is_lm else loss, "tau": tau, "alpha": alpha_text, "lr_schedule": lr}


_LIVE: set[subprocess.Popen] = set()  # the fits / predicts running now (stopped on Ctrl-C)
_STOP = threading.Event()  # set on Ctrl-C: no new subprocess starts


def _run(cmd: list[str], log: Path, env: dict) -> int:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        if _STOP.is_set():
            return 130
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _LIVE.add(proc)
        try:
            return proc.wait()
        except BaseException:  # Ctrl-C while waiting: the child is stopped, not left running
            _stop_children()
            raise
        finally:
            _LIVE.discard(proc)


def _stop_children(timeout: float = 60.0) -> None:
    """SIGTERM every running fit/predict (a fit saves its last.ckpt and exits; the run is redone on the rerun, as
    it has no result.json), then wait for them; SIGKILL what is still running after ``timeout`` seconds."""
    _STOP.set()
    procs = list(_LIVE)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def _exe() -> list[str]:
    return [sys.executable, "-m", "pd_lightning.cli"]


_PLANNED: set[Path] = set()  # caches a --dry_run has printed the predict command of


def ensure_cache(name: str, args, log: Path, env: dict) -> Path:
    """``<data_dir>/cache/<name>`` (complete = its index.json exists), made with ``pd-lightning predict`` if not."""
    out = Path(args.data_dir) / "cache" / name
    if (out / "index.json").exists() or (args.dry_run and out in _PLANNED):
        return out
    m = CACHE_RE.search(name)
    if not Path(args.teacher).exists() and not args.dry_run:
        raise FileNotFoundError(f"sweep: cache {out} is missing and --teacher {args.teacher} does not exist to make it")
    cmd = [
        *_exe(), "predict", "--config", "configs/cache/top-0.95-100.yaml", "--model.teacher", args.teacher,
        "--model.processor.init_args.p", m.group(1), "--model.processor.init_args.k", m.group(2),
        "--data.path", str(Path(args.data_dir) / "tokens.h5"), "--writer.output", str(out),
        "--writer.overwrite", "true", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(log.parent / "predict"),
    ]  # fmt: skip
    missing = "" if Path(args.teacher).exists() else ", which does not exist yet"
    say(f"sweep: writing cache {out} (teacher {args.teacher}{missing})")
    if args.dry_run:
        say(" ".join(cmd))
        _PLANNED.add(out)  # printed once: the runs after it would find it made
        return out
    rc = _run(cmd, log, env)
    if rc != 0:
        raise _failed(f"pd-lightning predict for {out}", rc, log)
    return out


def cache_bytes_per_token(cache: Path) -> float | None:
    try:
        from pd_lightning.cache.inspect import cache_info

        return float(cache_info(str(cache))["bytes_per_token"])
    except Exception:  # a figure for the table only
        return None


def _bench(run_dir: Path, args, log: Path, env: dict) -> dict | None:
    ckpts = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not args.eval_tasks or not ckpts:
        return None
    out = run_dir / "bench.json"
    cmd = [
        *_exe(), "validate", "--config", str(next(run_dir.rglob("config.yaml"))), "--ckpt_path", str(ckpts[-1]),
        "--trainer.logger", "false", "--eval.tasks", json.dumps(args.eval_tasks),
        "--eval.data_dir", args.eval_data, "--eval.output", str(out),
    ]  # fmt: skip
    if args.eval_limit:
        cmd += ["--eval.limit", str(args.eval_limit)]
    if _run(cmd, log, env) != 0 or not out.exists():
        cause = _cause(log)
        say(f"sweep: benchmark scoring of {run_dir} failed{': ' + cause if cause else ''}; see {log}")
        return None
    return json.loads(out.read_text())


SETTINGS = "sweep-settings.json"  # what every run of an output folder shares; a rerun must match it to reuse runs


def _settings(scale_text: str, args) -> dict:
    return {"scale": scale_text, "student": args.student, "fit_args": args.fit_args}


def check_settings(output: Path, scale_text: str, args) -> None:
    """A rerun into an output folder with finished runs must ask for the same scale, ``--student`` and ``--fit_args``:
    otherwise its table would silently mix (or reuse) runs made with other settings."""
    saved = output / SETTINGS
    if not saved.exists() or not list(output.glob("runs/*/result.json")):
        return
    old, new = json.loads(saved.read_text()), _settings(scale_text, args)
    if old == new:
        return
    if old.get("scale") != new["scale"]:
        was = _flatten(yaml.safe_load(old.get("scale") or "") or {})
        now = _flatten(yaml.safe_load(new["scale"] or "") or {})
        diff = [f"{k} {was.get(k)} -> {now.get(k)}" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
        what = "the scale (" + ", ".join(diff[:4]) + (", …" if len(diff) > 4 else "") + ")"
    else:
        what = ", ".join(f"--{k} {old.get(k)!r} -> {new[k]!r}" for k in ("student", "fit_args") if old.get(k) != new[k])
    raise SweepError(
        f"sweep: {output} holds finished runs made with other settings: {what}; give another --output, or the "
        f"settings of {saved}"
    )


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def run_one(config: Path, seed: int, args, scale_file: Path, tokens: Path, env: dict) -> dict:
    """One fit subprocess (skipped when its ``result.json`` exists); returns its table row."""
    name = config.stem
    run_dir = Path(args.output) / "runs" / f"{name}-s{seed}"
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cache = ensure_cache(cache_name(config), args, Path(args.output) / "sweep.log", env)
    cmd = [
        *_exe(), "fit", *(["--config", str(scale_file)] if scale_file else []), "--config", str(config),
        "--data.init_args.path", str(cache), "--data.init_args.val_tokens", str(tokens),
        "--seed_everything", str(seed), "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run_dir),
        "--trainer.logger.name", "log", "--trainer.logger.version", "0",
    ]  # fmt: skip
    if args.student:
        cmd += ["--model.student.preset", args.student]
    cmd += args.fit_args.split()
    if args.dry_run:
        say(" ".join(cmd))
        return {}
    if run_dir.exists():  # an interrupted run restarts from its beginning
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    rc = _run(cmd, run_dir / "fit.log", env)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise _failed(f"run {name} seed {seed}", rc, run_dir / "fit.log")
    config_file = next(run_dir.rglob("config.yaml"))
    resolved = yaml.safe_load(config_file.read_text())
    curve = val_curve(run_dir)
    if not curve:
        raise SweepError(f"sweep: run {name} seed {seed} logged no val/loss; see {run_dir / 'fit.log'}")
    trainer, data = resolved.get("trainer", {}), resolved["data"]["init_args"]
    import h5py

    with h5py.File(tokens, "r") as f:
        seq_len = int(f.attrs.get("seq_len", 0))
    m = CACHE_RE.search(cache.name)
    row = {
        "name": name,
        "seed": seed,
        "student": resolved["model"]["student"].get("preset") if resolved["model"].get("student") else None,
        **describe(resolved),
        "cache": cache.name,
        "p": float(m.group(1)),
        "k": int(m.group(2)),
        "cache_bytes_per_token": cache_bytes_per_token(cache),
        "val_loss": curve[-1][1],
        "val_ppl": math.exp(curve[-1][1]),
        "val_bpb": last_val_bpb(run_dir),
        "val_curve": curve,
        "tokens": int(trainer["max_steps"]) * int(data["batch_size"]) * seq_len
        * int(trainer.get("accumulate_grad_batches") or 1) * int(trainer.get("devices") or 1),
        "wall_s": round(wall, 1),
        "config_file": str(config),
        "config": resolved,
    }  # fmt: skip
    bench = _bench(run_dir, args, run_dir / "fit.log", env)
    if bench:
        row["bench"] = {k: bench[k] for k in ("scores", "average") if k in bench}
        row["bench_average"] = bench.get("average")
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, default=str) + "\n")
    os.replace(tmp, done)  # written once the run is complete: the resume marker
    return row


def write_table(rows: list[dict], output: Path) -> None:
    """``results.jsonl`` (everything) and ``results.csv`` (the scalar columns), replaced atomically."""
    jsonl, csv_path = output / "results.jsonl", output / "results.csv"
    tmp = jsonl.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    os.replace(tmp, jsonl)
    tmp = csv_path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, csv_path)


def sweep(argv: list[str]) -> list[dict]:
    args = build_parser().parse_args(argv)
    scale = SCALES.get(args.scale)
    if scale is None and (args.max_steps is not None or args.val_sequences is not None):
        raise ValueError("sweep: --max_steps / --val_sequences need a --scale (the config sets them with --scale none)")
    if scale is None:
        pass
    elif args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"sweep: --max_steps must be >= 1, got {args.max_steps}")
        scale = Scale(**{**scale.__dict__, "max_steps": args.max_steps})
    if scale is not None and args.val_sequences is not None:
        scale = Scale(**{**scale.__dict__, "val_sequences": args.val_sequences})
    if args.jobs < 1:
        raise ValueError(f"sweep: --jobs must be >= 1, got {args.jobs}")
    if args.eval_tasks and not args.eval_data:
        raise ValueError("sweep: --eval_tasks needs --eval_data (a folder written by pd-lightning eval-data)")
    configs = expand_configs(args.configs)
    for config in configs:  # every YAML readable and an experiment before anything runs
        load_config(config)
    baseline = None
    if args.baseline != "none":
        base = Path(args.baseline) if args.baseline else configs[0].parent / "lm-baseline.yaml"
        if args.baseline and not base.is_file():
            raise FileNotFoundError(f"sweep: --baseline {base} does not exist (or give --baseline none)")
        if base.is_file():
            load_config(base)
            baseline = base
            if base in configs:
                configs.remove(base)
            configs.insert(0, base)
    tokens = Path(args.data_dir) / "tokens.h5"
    if not tokens.exists():
        raise FileNotFoundError(
            f"sweep: {tokens} is missing; run `make demo` or pd-lightning prepare, or set --data_dir"
        )
    output = Path(args.output)
    scale_file = output / "scale.yaml" if scale is not None else None
    scale_text = (
        f"# pd-lightning sweep --scale {args.scale}: the base config every run of this sweep layers its row on\n"
        + yaml.safe_dump(scale_yaml(scale, str(tokens)), sort_keys=False)
        if scale is not None
        else ""
    )
    check_settings(output, scale_text, args)
    if args.dry_run:  # nothing is written: the scale file the commands name is shown instead
        _PLANNED.clear()
        if scale_file is not None:
            print(f"# {scale_file} (not written by --dry_run):\n{scale_text}", end="")
    else:
        output.mkdir(parents=True, exist_ok=True)
        if scale_file is not None:
            scale_file.write_text(scale_text)
        (output / SETTINGS).write_text(json.dumps(_settings(scale_text, args), indent=1) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    jobs = [(c, s) for s in args.seeds for c in configs]
    for name in dict.fromkeys(cache_name(c) for c in configs):  # caches first, one at a time
        ensure_cache(name, args, output / "sweep.log", env)
    results: dict[int, dict] = {}
    t0 = time.perf_counter()

    def one(i: int) -> None:
        config, seed = jobs[i]
        label = f"[{i + 1}/{len(jobs)}] {config.stem} seed {seed}"
        finished = (output / "runs" / f"{config.stem}-s{seed}" / "result.json").exists()
        if not finished:
            say(f"sweep {label} ...")
        row = run_one(config, seed, args, scale_file, tokens, env)
        if row:
            row["baseline"] = config == baseline
            how = "already done, skipped" if finished else f"{row['wall_s']:.0f} s"
            say(f"sweep {label}: val/loss {row['val_loss']:.4f} ({how})")
            with lock:
                results[i] = row
                write_table([results[j] for j in sorted(results)], output)

    lock = threading.Lock()
    if args.jobs == 1:
        for i in range(len(jobs)):
            one(i)
    else:  # runs side by side (each a subprocess); the table keeps the jobs' order
        pool = ThreadPoolExecutor(args.jobs)
        futures = [pool.submit(one, i) for i in range(len(jobs))]
        try:
            for future in futures:
                future.result()
        except BaseException:  # Ctrl-C or a failed run: start nothing more, stop what runs
            pool.shutdown(wait=False, cancel_futures=True)
            _stop_children()
            raise
        pool.shutdown()
    rows = [results[j] for j in sorted(results)]
    if not args.dry_run:
        print(f"sweep: {len(rows)} runs, {time.perf_counter() - t0:.0f} s; table {output / 'results.csv'}")
    return rows


class _Terminated(BaseException):
    """SIGTERM (``kill``, a scheduler's stop) raised in the sweep's main thread: handled as Ctrl-C is, exit 143."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def main(argv: list[str]) -> list[dict]:
    _STOP.clear()
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return sweep(argv)
    except SweepError as e:
        print(f"pd-lightning: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except (KeyboardInterrupt, _Terminated) as e:
        _stop_children()
        how, code = ("stopped by SIGTERM", 143) if isinstance(e, _Terminated) else ("interrupted", 130)
        print(f"pd-lightning: sweep {how}; finished runs are kept, the same command resumes the sweep at the "
              "interrupted run", file=sys.stderr)  # fmt: skip
        raise SystemExit(code) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
