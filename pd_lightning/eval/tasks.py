"""The seven benchmarks as lm-eval tasks over local JSON Lines files.

Data layout (each benchmark's public Hugging Face schema, one JSON object per line)::

    <data_dir>/hellaswag/validation.jsonl     ctx_a ctx_b ctx endings label activity_label
    <data_dir>/winogrande/validation.jsonl    sentence option1 option2 answer
    <data_dir>/piqa/validation.jsonl          goal sol1 sol2 label
    <data_dir>/mmlu/{test,dev}.jsonl          question subject choices answer
    <data_dir>/c3/validation.jsonl            context question choice answer     (+ optional train.jsonl)
    <data_dir>/ceval/{val,dev}.jsonl          question A B C D answer
    <data_dir>/gsm8k/{test,train}.jsonl       question answer

MMLU and C-Eval also take one folder per subject (``mmlu/<subject>/test.jsonl``, ``ceval/<subject>/val.jsonl``,
each with its ``dev.jsonl``); the folder name is the subject. The dev / train files are needed only for few-shot.

The task definitions live in ``evaluation/tasks/<task>.yaml``: lm-eval keys plus a ``pd_lightning`` block (which
lm-eval file to ``include:``, the data files, required fields, default shots, primary metric). ``write_task_dir``
turns them into plain lm-eval YAMLs with absolute data paths, loadable with ``TaskManager(include_path=...)`` or
``lm_eval --include_path``; ``python -m pd_lightning.eval.tasks --data_dir D --output OUT`` does it from a shell.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_SUBJECT = re.compile(r"[A-Za-z0-9_\-]+")

KNOWN_TASKS = ("hellaswag", "winogrande", "piqa", "mmlu", "c3", "ceval", "gsm8k")

# evaluation/tasks/ of the repository (the package sits beside it).
TASK_TEMPLATES = Path(__file__).resolve().parents[2] / "evaluation" / "tasks"


def _template(task: str) -> dict:
    path = TASK_TEMPLATES / f"{task}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"task definition {str(path)!r} is missing from this installation")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def task_spec(task: str) -> dict:
    """The ``pd_lightning`` block of a task's definition."""
    return dict(_template(task)["pd_lightning"])


DEFAULT_FEWSHOT = {t: int(task_spec(t)["num_fewshot"]) for t in KNOWN_TASKS} if TASK_TEMPLATES.is_dir() else {}
PRIMARY_METRIC = {t: str(task_spec(t)["primary_metric"]) for t in KNOWN_TASKS} if TASK_TEMPLATES.is_dir() else {}


def resolve_tasks(tasks: Sequence[str] | str) -> list[str]:
    """Task names from a list or a comma-separated string; refuses unknown names (listing the known ones)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise ValueError(f"no tasks given; choose from {', '.join(KNOWN_TASKS)}")
    unknown = [t for t in names if t not in KNOWN_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(KNOWN_TASKS)}")
    return list(dict.fromkeys(names))


@dataclass
class TaskData:
    """The files found for one task: ``files[subject][split] = path`` (subject ``""`` for one flat file)."""

    task: str
    files: dict[str, dict[str, Path]] = field(default_factory=dict)
    flat_subjects: bool = False  # one flat file whose rows carry a ``subject`` field


def read_jsonl(path: Path, what: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of a JSON Lines file; a line that is not a JSON object is
    refused as ``<path>:<line>: …`` (``what`` names the row kind in the message). Shared with ``eval-data``."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                where = f"column {e.colno}" if e.msg.endswith(" at") else f"at column {e.colno}"
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} {where})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: a {what} row must be a JSON object")
            rows.append((n, row))
    return rows


def _is_texts(value, sizes: Sequence[int]) -> bool:
    return isinstance(value, list) and len(value) in sizes and all(isinstance(v, str) for v in value)


def _value_problem(task: str, row: dict) -> str | None:
    """What is wrong with a row's values for its benchmark's prompt and answer (None if nothing): an answer the
    task cannot map to a choice would otherwise stop scoring half-way with a bare Python error."""
    if task == "hellaswag":
        if not _is_texts(row["endings"], (4,)):
            return "endings must be a list of 4 strings"
        if str(row["label"]) not in ("0", "1", "2", "3"):
            return f"label {row['label']!r} must be 0-3"
    elif task == "winogrande":
        if str(row["answer"]) not in ("1", "2"):
            return f"answer {row['answer']!r} must be '1' or '2'"
    elif task == "piqa":
        if row["label"] not in (0, 1, "0", "1"):
            return f"label {row['label']!r} must be 0 or 1"
    elif task == "mmlu":
        if not _is_texts(row["choices"], (4,)):
            return "choices must be a list of 4 strings"
        if row["answer"] not in (0, 1, 2, 3):
            return f"answer {row['answer']!r} must be 0-3 (the index of the right choice)"
    elif task == "ceval":
        if row["answer"] not in ("A", "B", "C", "D"):
            return f"answer {row['answer']!r} must be one of A, B, C, D"
    elif task == "c3":
        if not _is_texts(row["context"], range(1, 10_000)):
            return "context must be a list of strings (the dialogue turns or the passage), as in the clue/c3 schema"
        if not _is_texts(row["choice"], (2, 3, 4)):
            return "choice must be a list of 2-4 strings"
        if row["answer"] not in row["choice"]:
            return f"answer {row['answer']!r} is not one of its choices {row['choice']}"
    elif task == "gsm8k":
        if not isinstance(row["answer"], str) or "####" not in row["answer"]:
            return "answer must be a string ending in '#### <number>'"
    return None


def _check_rows(path: Path, task: str, fields: Sequence[str]) -> list[dict]:
    rows = []
    for n, row in read_jsonl(path, task):
        missing = [k for k in fields if k not in row]
        if missing:
            raise ValueError(
                f"{path}:{n}: {task} row lacks field(s) {', '.join(missing)} (expected {', '.join(fields)})"
            )
        problem = _value_problem(task, row)
        if problem:
            raise ValueError(f"{path}:{n}: {task} row: {problem}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: holds no {task} rows")
    return rows


def _count_by(rows: list[dict], key: str | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        k = str(r.get(key, "")) if key else ""
        counts[k] = counts.get(k, 0) + 1
    return counts


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning line on stderr, once per process (the data is checked before and again during scoring)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"pd-lightning: warning: {message}", file=sys.stderr, flush=True)


def _shots_hint(task: str) -> str:
    return f"add rows, or lower num_fewshot for {task} (validate: --eval.num_fewshot '{{{task}: N}}')"


def _check_subject_pool(task: str, n: int, available: int, where: str) -> None:
    """MMLU / C-Eval take the first ``n`` dev rows of the same subject (lm-eval's ``first_n`` sampler)."""
    if n > available:
        raise ValueError(
            f"{task}: {n}-shot needs {n} dev rows per subject, {where} has {available}; {_shots_hint(task)}"
        )


def _check_fewshot_pool(
    task: str, n: int, counts: dict[str, int], files: dict[str, Path], main: str, few: str | None
) -> None:
    """The few-shot examples are drawn from the ``few`` split when its file is there, else from the scored split
    without the scored row itself (so that split needs ``n + 1`` rows)."""
    if n == 0:
        return
    if few and few in counts:
        if counts[few] < n:
            raise ValueError(
                f"{task}: {n}-shot needs {n} rows in {files[few]}, it has {counts[few]}; {_shots_hint(task)}"
            )
        return
    if counts[main] < n + 1:
        alt = f" (or a {files[few]} with {n})" if few else ""
        raise ValueError(
            f"{task}: {n}-shot draws its examples from the other rows of {files[main]}, which needs {n + 1} rows{alt}, "
            f"it has {counts[main]}; {_shots_hint(task)}"
        )


def check_data(
    data_dir: str | os.PathLike,
    tasks: Sequence[str] | str,
    num_fewshot: dict[str, int] | None = None,
    check_shots: bool = True,
) -> dict[str, TaskData]:
    """Check that ``data_dir`` holds every file the tasks need and that every row has its benchmark's fields.

    Raises FileNotFoundError naming the task and the expected path, ValueError naming the file and line of a bad
    row, ValueError listing the known tasks for an unknown name, and (``check_shots``) ValueError when a few-shot
    pool holds fewer rows than the shots need. Returns the files found, per task.
    """
    names = resolve_tasks(tasks)
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise ValueError(f"eval data folder {str(root)!r} is a file, not a folder of <task>/<split>.jsonl")
    if not root.is_dir():
        raise FileNotFoundError(
            f"eval data folder {str(root)!r} does not exist (write it with `pd-lightning eval-data`)"
        )
    shots = {**DEFAULT_FEWSHOT, **(num_fewshot or {})}
    for task, n in shots.items():
        if int(n) < 0:
            raise ValueError(f"num_fewshot for {task} must be >= 0, got {n}")
    found = {}
    for task in names:
        spec = task_spec(task)
        splits: dict[str, str] = spec["splits"]
        few = spec.get("fewshot_split")
        optional = set(spec.get("optional_splits", []))
        if few and shots.get(task, 0) == 0:
            optional.add(few)
        data = TaskData(task)
        if spec.get("subjects"):
            task_root = root / task
            flat = {s: task_root / Path(p).name for s, p in splits.items()}
            main = next(s for s in splits if s != few)
            folders = sorted(d for d in task_root.iterdir() if d.is_dir()) if task_root.is_dir() else []
            folders = [d for d in folders if (d / flat[main].name).is_file()]
            if folders and flat[main].is_file():
                _warn_once(
                    f"{task}: both {flat[main]} and per-subject folders ({len(folders)}, e.g. {folders[0]}) are "
                    f"present; scoring the folders (each subject with its own description and dev shots) and "
                    f"ignoring {flat[main]}; move one of them away to silence this"
                )
            if flat[main].is_file() and not folders:
                required = {s: p for s, p in flat.items() if s not in optional}
                for s, p in required.items():
                    if not p.is_file():
                        raise FileNotFoundError(f"{task}: expected {p} (the {s} split; needed for few-shot)")
                per_split = {s: _check_rows(p, task, spec["fields"]) for s, p in flat.items() if p.is_file()}
                data.flat_subjects = all("subject" in r for r in per_split[main])
                if data.flat_subjects:
                    for s, rows in per_split.items():
                        for n, r in enumerate(rows, 1):
                            if not _SUBJECT.fullmatch(str(r.get("subject", ""))):
                                raise ValueError(
                                    f"{flat[s]}: row {n}: subject {r.get('subject')!r} must be a name of letters, "
                                    "digits, '_' or '-' (e.g. high_school_physics)"
                                )
                data.files[""] = {s: p for s, p in flat.items() if p.is_file()}
                if few in per_split and check_shots:
                    by_subject = _count_by(per_split[few], "subject" if data.flat_subjects else None)
                    for subject in _count_by(per_split[main], "subject" if data.flat_subjects else None):
                        where = f"{flat[few]} (subject {subject})" if subject else str(flat[few])
                        _check_subject_pool(task, int(shots.get(task, 0)), by_subject.get(subject, 0), where)
            elif folders:
                for d in folders:
                    files = {s: d / Path(p).name for s, p in splits.items()}
                    for s, p in files.items():
                        if s not in optional and not p.is_file():
                            raise FileNotFoundError(f"{task}: expected {p} (the {s} split of subject {d.name})")
                        if p.is_file():
                            rows = _check_rows(p, task, spec["fields"])
                            if s == few and check_shots:
                                _check_subject_pool(task, int(shots.get(task, 0)), len(rows), str(p))
                    data.files[d.name] = {s: p for s, p in files.items() if p.is_file()}
            else:
                raise FileNotFoundError(
                    f"{task}: expected {flat[main]} or one folder per subject ({task_root}/<subject>/{flat[main].name})"
                )
        else:
            files = {s: root / p for s, p in splits.items()}
            counts = {}
            for s, p in files.items():
                if s not in optional and not p.is_file():
                    raise FileNotFoundError(f"{task}: expected {p} (the {s} split)")
                if p.is_file():
                    counts[s] = len(_check_rows(p, task, spec["fields"]))
            data.files[""] = {s: p for s, p in files.items() if p.is_file()}
            main = next(s for s in splits if s != few)
            if check_shots:
                _check_fewshot_pool(task, int(shots.get(task, 0)), counts, files, main, few)
        found[task] = data
    return found


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


def _ceval_subject_names() -> dict[str, str]:
    try:
        from lm_eval.tasks.ceval._generate_configs import SUBJECTS
    except ImportError:  # pragma: no cover - lm-eval layout changed
        return {}
    return dict(SUBJECTS)


def _split_by_subject(data: TaskData, out: Path) -> dict[str, dict[str, Path]]:
    """Flat files whose rows carry ``subject`` -> one file per subject and split under ``out``."""
    files: dict[str, dict[str, Path]] = {}
    for split, path in data.files[""].items():
        by_subject: dict[str, list[str]] = {}
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    by_subject.setdefault(str(json.loads(line)["subject"]), []).append(line.rstrip("\n"))
        for subject, lines in by_subject.items():
            target = out / data.task / subject / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("\n".join(lines) + "\n", encoding="utf-8")
            files.setdefault(subject, {})[split] = target
    return files


def write_task_dir(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tasks: Sequence[str] | str = KNOWN_TASKS,
    num_fewshot: dict[str, int] | None = None,
) -> dict[str, list[str]]:
    """Write lm-eval task YAMLs for ``tasks`` reading ``data_dir`` into ``out_dir``.

    Returns ``{task: [lm-eval subtask names]}`` (one per subject for MMLU / C-Eval, which are lm-eval groups).
    """
    names = resolve_tasks(tasks)
    shots = {**DEFAULT_FEWSHOT, **(num_fewshot or {})}
    for task, n in shots.items():
        if int(n) < 0:
            raise ValueError(f"num_fewshot for {task} must be >= 0, got {n}")
    found = check_data(data_dir, names, shots)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm_tasks = _lm_eval_tasks_dir()
    written: dict[str, list[str]] = {}
    for task in names:
        template = _template(task)
        spec = template.pop("pd_lightning")
        data = found[task]
        n_shots = int(shots[task])
        few = spec.get("fewshot_split")
        if not spec.get("subjects"):
            cfg = dict(template)
            if spec.get("lm_eval_include"):
                cfg = {"include": str(lm_tasks / spec["lm_eval_include"]), **cfg}
            files = data.files[""]
            cfg["dataset_kwargs"] = {"data_files": {s: str(p.resolve()) for s, p in files.items()}}
            if few and few not in files:  # no few-shot file: lm-eval falls back to the scored split
                cfg["fewshot_split"] = None
                if cfg.get("training_split") == few:
                    cfg["training_split"] = None
            elif few:
                cfg["fewshot_split"] = few
            cfg["num_fewshot"] = n_shots
            (out / f"{task}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
            written[task] = [task]
            continue
        subjects = _split_by_subject(data, out / "_data") if data.flat_subjects else data.files
        # Only subjects with rows to score: MMLU's dev split holds every subject, its test split may hold fewer.
        main = next(s for s in spec["splits"] if s != few)
        subjects = {s: f for s, f in subjects.items() if main in f}
        zh = _ceval_subject_names()
        subtasks = []
        for subject, files in sorted(subjects.items()):
            name = subject or "all"
            cfg = {k: (v.format(subject=name) if isinstance(v, str) else v) for k, v in template.items()}
            own = lm_tasks / spec["lm_eval_include"].format(subject=subject)
            if subject and own.is_file():
                cfg = {"include": str(own), **cfg}
            else:
                cfg = {"include": str(lm_tasks / spec["lm_eval_include_fallback"]), **cfg}
                if subject:
                    cfg["description"] = spec["description"].format(
                        subject_words=" ".join(subject.split("_")), subject_zh=zh.get(subject, subject)
                    )
            cfg["dataset_kwargs"] = {"data_files": {s: str(p.resolve()) for s, p in files.items()}}
            cfg["num_fewshot"] = n_shots
            if few not in files:
                cfg["fewshot_split"] = None
            cfg.pop("tag", None)
            cfg["tag"] = []
            (out / f"{task}_{name}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
            subtasks.append(cfg["task"])
        group = {
            "group": task,
            "task": subtasks,
            "aggregate_metric_list": [
                {"metric": m, "aggregation": "mean", "weight_by_size": True} for m in spec["group_metrics"]
            ],
            "metadata": {"version": 1.0},
        }
        (out / f"_{task}_group.yaml").write_text(yaml.safe_dump(group, allow_unicode=True, sort_keys=False))
        written[task] = subtasks
    return written


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pd_lightning.eval.tasks --data_dir D --output OUT``: write the lm-eval task folder."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data_dir", required=True, help="folder with <task>/<split>.jsonl")
    parser.add_argument("--output", required=True, help="folder to write the lm-eval YAMLs to")
    parser.add_argument("--tasks", default=",".join(KNOWN_TASKS))
    args = parser.parse_args(argv)
    try:
        written = write_task_dir(args.data_dir, args.output, args.tasks)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"pd_lightning.eval.tasks: error: {e}\n")
    for task, subtasks in written.items():
        print(f"{task}: {len(subtasks)} lm-eval task(s)")
    print(f"use: lm_eval --include_path {args.output} --tasks {','.join(written)} ...")


if __name__ == "__main__":
    main()
