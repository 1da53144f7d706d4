"""Score an lm-eval model on the seven benchmarks from local files: ``evaluate(lm, tasks, data_dir) -> dict``.

Each task's primary metric (its score, in percent; the paper's tables report these and their average):

=========== ========================== =====================================================================
task        primary metric             why
=========== ========================== =====================================================================
hellaswag   acc_norm                   length-normalised accuracy, the figure usually quoted for HellaSwag
winogrande  acc                        the only metric lm-eval reports for it
piqa        acc_norm                   as HellaSwag (lm-eval reports acc and acc_norm)
mmlu        acc                        subject-size-weighted mean over subjects (lm-eval's ``mmlu`` group)
c3          acc                        accuracy over the choices' texts
ceval       acc                        subject-size-weighted mean over subjects
gsm8k       exact_match,strict-match   the number after "#### " equals the reference (lm-eval's first filter)
=========== ========================== =====================================================================

Every metric lm-eval reports is kept in ``results``; ``primary`` overrides the choice per task.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from pd_lightning.eval.tasks import DEFAULT_FEWSHOT, PRIMARY_METRIC, resolve_tasks, write_task_dir


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) random states afterwards: lm-eval seeds all three."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars while lm-eval loads the local JSONL files (a "Generating … split" bar per split
    and task: noise in a training log); the previous setting is restored."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def quiet_git_hash() -> Iterator[None]:
    """lm-eval records ``git describe`` of the working directory and lets git print "fatal: not a git repository"
    outside a checkout (noise in every scoring run); the same lookup here, with git's stderr discarded."""
    import subprocess

    import lm_eval.evaluator as evaluator

    def git_hash():
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=False)
        except FileNotFoundError:
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    saved = getattr(evaluator, "get_git_commit_hash", None)
    if saved is None:  # pragma: no cover - lm-eval layout changed
        yield
        return
    evaluator.get_git_commit_hash = git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = saved


def _metrics(raw: dict) -> dict:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` -> ``{"acc": x, "acc_stderr": s}``;
    metrics under a named filter keep it (``exact_match,strict-match``)."""
    out = {}
    for key, value in raw.items():
        if "," not in key or not isinstance(value, int | float):
            continue
        metric, filt = key.split(",", 1)
        out[metric if filt == "none" else key] = float(value)
    return out


def evaluate(
    lm,
    tasks: Sequence[str] | str,
    data_dir: str,
    num_fewshot: dict[str, int] | None = None,
    limit: int | float | None = None,
    seed: int = 1234,
    log_samples: bool = False,
    primary: dict[str, str] | None = None,
    bootstrap_iters: int = 0,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` on ``tasks`` read from ``data_dir`` (see ``pd_lightning.eval.tasks``).

    Args:
        lm: an lm-eval ``LM`` (e.g. ``StudentLM``).
        tasks: names among ``KNOWN_TASKS`` (list or comma-separated).
        data_dir: the folder holding ``<task>/<split>.jsonl``.
        num_fewshot: shots per task, overriding the paper's defaults (``DEFAULT_FEWSHOT``).
        limit: at most this many examples per (sub)task (an int), or this fraction of them (a float < 1).
        seed: seeds lm-eval's few-shot sampling and its random / numpy / torch seeds; the caller's random states
            are restored afterwards.
        log_samples: keep lm-eval's per-example records under ``"samples"``.
        primary: per-task primary metric overrides (keys as in ``results``, e.g. ``{"piqa": "acc"}``).
        bootstrap_iters: lm-eval's bootstrap iterations for the stderr of non-mean metrics (0 = skip).

    Returns:
        ``{"results": {task: {metric: value}}, "scores": {task: primary metric x 100}, "average": mean of the
        scores, "config": {...}}`` (plus ``"subtasks"`` for MMLU / C-Eval subjects and ``"samples"`` if asked).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = resolve_tasks(tasks)
    shots = {t: int({**DEFAULT_FEWSHOT, **(num_fewshot or {})}[t]) for t in names}
    chosen = {t: (primary or {}).get(t, PRIMARY_METRIC[t]) for t in names}
    with tempfile.TemporaryDirectory(prefix="pd_lightning_tasks_") as tmp:
        written = write_task_dir(data_dir, tmp, names, shots)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        with preserved_rng(), quiet_datasets(), quiet_git_hash():
            out = simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                limit=limit,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                log_samples=log_samples,
                bootstrap_iters=bootstrap_iters,
            )
    raw = out["results"]
    results = {t: _metrics(raw[t]) for t in names}
    scores = {}
    for t in names:
        if chosen[t] not in results[t]:
            raise KeyError(f"{t}: lm-eval reported no {chosen[t]!r} (it has {sorted(results[t])})")
        scores[t] = 100.0 * results[t][chosen[t]]
    subtasks = {s: _metrics(raw[s]) for t in names for s in written[t] if s != t and s in raw}
    n_samples = _n_samples(out.get("n-samples", {}), names, written)
    report = {
        "results": results,
        "scores": scores,
        "average": float(np.mean(list(scores.values()))),
        "config": {
            "tasks": names,
            "num_fewshot": shots,
            "primary_metric": chosen,
            "limit": limit,
            # lm-eval applies a limit to every task it runs: a group's (MMLU, C-Eval) to each of its subjects.
            "limit_applies_to": "each task; each subject of mmlu and ceval" if limit is not None else None,
            "seed": seed,
            "data_dir": str(data_dir),
            "n_samples": n_samples,
            "lm_eval_version": out.get("config", {}).get("lm_eval_version") or _lm_eval_version(),
        },
    }
    if subtasks:
        report["subtasks"] = subtasks
    if log_samples:
        report["samples"] = out.get("samples", {})
    return report


def _n_samples(per_task: dict, names: list[str], written: dict[str, list[str]]) -> dict:
    """lm-eval's ``{"original": documents, "effective": documents scored}`` per task; a group (MMLU, C-Eval), which
    lm-eval leaves out, gets the sums over its subjects (``effective`` shows what a per-subject limit left)."""
    counts = {}
    for t in names:
        if t in per_task:
            counts[t] = dict(per_task[t])
            continue
        parts = [per_task[s] for s in written[t] if s in per_task]
        if parts:
            counts[t] = {k: sum(int(p.get(k, 0)) for p in parts) for k in ("original", "effective")}
            counts[t]["subjects"] = len(parts)
    return counts


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")
