"""``pd-lightning eval-data``: the seven benchmarks -> ``<output>/<task>/<split>.jsonl`` in Hugging Face schemas.

Sources, per task (``--<task> PATH``), detected from what PATH holds:

* a Hugging Face ``datasets`` folder: ``DatasetDict.save_to_disk`` output (``dataset_dict.json``), the
  ``datasets`` cache of a ``load_dataset`` call (``<builder>-<split>[-NNNNN-of-NNNNN].arrow``), or a hub
  snapshot / ``huggingface-cli download`` folder (``<split>-NNNNN-of-NNNNN.parquet``). Rows already follow the
  hub schema; they are checked and written as they are.
* the benchmark's original release files:

  ============ ============================================================ ==============================
  task         files (found anywhere under PATH)                             written
  ============ ============================================================ ==============================
  hellaswag    ``hellaswag_val.jsonl`` (``hellaswag_train.jsonl``), or any   validation (train)
               ``.jsonl`` of that format given as the file, or alone in a
               folder
  winogrande   ``dev.jsonl`` + ``dev-labels.lst`` (``train_xl*``)            validation (train)
  piqa         ``valid.jsonl`` + ``valid-labels.lst`` (or ``dev.*``; ``train*``) validation (train)
  mmlu         ``dev/<subject>_dev.csv``, ``test/<subject>_test.csv``        ``<subject>/{dev,test}``
  ceval        ``dev/<subject>_dev.csv``, ``val/<subject>_val.csv``          ``<subject>/{dev,val}``
  c3           ``{d,m}-dev.json`` (``{d,m}-train.json``), CLUE's names, or   validation (train)
               nlpdata/c3's ``c3-{d,m}-*.json``; both halves (dialogue d,
               mixed-genre m) of a split, d first; a half given as the file
               takes its other half from beside it
  gsm8k        ``test.jsonl``, ``train.jsonl``                               test, train
  ============ ============================================================ ==============================

Only HellaSwag and C3 take a file as PATH; the others take a folder (a file is refused in one line). MMLU and
C-Eval are written one folder per subject (the folder name fills the prompt's subject). Everything is
converted and checked in memory first, then written to a temporary folder and renamed into place, so bad input
writes nothing.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from pd_lightning.eval.tasks import KNOWN_TASKS, read_jsonl

# Hub schema of each task: the fields every written row has.
FIELDS = {
    "hellaswag": ("ctx_a", "ctx_b", "ctx", "endings", "label", "activity_label"),
    "winogrande": ("sentence", "option1", "option2", "answer"),
    "piqa": ("goal", "sol1", "sol2", "label"),
    "mmlu": ("question", "subject", "choices", "answer"),
    "c3": ("context", "question", "choice", "answer"),
    "ceval": ("question", "A", "B", "C", "D", "answer"),
    "gsm8k": ("question", "answer"),
}
# Splits written (first ones required: the evaluation and, where few-shot needs one, the few-shot split).
REQUIRED_SPLITS = {
    "hellaswag": ("validation",),
    "winogrande": ("validation",),
    "piqa": ("validation",),
    "mmlu": ("test", "dev"),
    "c3": ("validation",),
    "ceval": ("val", "dev"),
    "gsm8k": ("test", "train"),
}
# What a --<task> that takes only a folder expects (the one-line error for a file given instead).
FOLDER_ONLY = {
    "winogrande": "the folder holding dev.jsonl + dev-labels.lst (winogrande_1.1) or a Hugging Face datasets folder",
    "piqa": "the folder holding valid.jsonl + valid-labels.lst (or dev.*) or a Hugging Face datasets folder",
    "mmlu": "the folder holding test/ and dev/<subject>_<split>.csv (MMLU's data/) or a Hugging Face datasets folder",
    "ceval": "the folder holding val/ and dev/<subject>_<split>.csv (ceval-exam.zip) or a Hugging Face datasets folder",
    "gsm8k": "the folder holding test.jsonl + train.jsonl (grade_school_math/data/) or a Hugging Face datasets folder",
}
OPTIONAL_SPLITS = {"hellaswag": ("train",), "winogrande": ("train",), "piqa": ("train",), "c3": ("train",)}
PER_SUBJECT = ("mmlu", "ceval")
LETTERS = "ABCD"

Rows = list[dict]
Files = dict[str, Rows]  # "<split>.jsonl" or "<subject>/<split>.jsonl" -> rows


# ---- small readers ---------------------------------------------------------------------------------------------
def _find(root: Path, name: str, task: str, required: bool = True) -> Path | None:
    """The one file called ``name`` under the folder ``root``."""
    if not root.is_dir():
        raise ValueError(f"--{task} {root}: expected a folder holding {name!r}, got a file")
    hits = sorted(root.rglob(name))
    if len(hits) > 1:
        raise ValueError(f"--{task} {root}: several files named {name!r} ({', '.join(map(str, hits[:3]))}); "
                         f"point --{task} at the folder holding one")  # fmt: skip
    if not hits and required:
        raise FileNotFoundError(f"--{task} {root}: no {name!r} under it (expected the {task} release files)")
    return hits[0] if hits else None


def _not_utf8(path: Path) -> ValueError:
    """The one line for a file that is not UTF-8 text (random bytes, a binary or another encoding): the file, the
    line and the byte, instead of the decoder's message that names neither."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
        where = ""
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f" (line {line}, byte {e.start}: 0x{data[e.start]:02x})"
    return ValueError(f"{path}: not UTF-8 text{where}; is it the right file? (convert it to UTF-8 if it is)")


def _read_jsonl(path: Path) -> Rows:
    """The objects of a JSON Lines file, each with its line number as ``__line__`` (for the error messages)."""
    try:
        return [{**row, "__line__": n} for n, row in read_jsonl(path, "benchmark")]
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _read_labels(path: Path, n: int, allowed: tuple[str, ...]) -> list[str]:
    labels = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    if len(labels) != n:
        raise ValueError(f"{path}: {len(labels)} labels for {n} rows of the questions file")
    for lineno, label in enumerate(labels, 1):
        if label not in allowed:
            raise ValueError(f"{path}:{lineno}: label {label!r} is not one of {list(allowed)}")
    return labels


def _need(row: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in row or row[f] is None]
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r} (needs {', '.join(fields)})")


def _where(path: Path, row: dict) -> str:
    return f"{path}:{row.get('__line__', '?')}"


# ---- original release formats ------------------------------------------------------------------------------------
HS_OTHER_SPLITS = {"hellaswag_train.jsonl": "train", "hellaswag_test.jsonl": "test (unlabelled)"}


def _hellaswag_rows(path: Path) -> Rows:
    rows = []
    for row in _read_jsonl(path):
        _need(row, FIELDS["hellaswag"], _where(path, row))
        if not isinstance(row["endings"], list) or len(row["endings"]) < 2:
            raise ValueError(f"{_where(path, row)}: 'endings' must be a list of the candidate endings")
        row.pop("__line__")
        rows.append({**row, "label": str(row["label"])})  # the hub schema holds the label as a string
    if not rows:
        raise ValueError(f"{path}: holds no HellaSwag rows")
    return rows


def _hellaswag(src: Path) -> Files:
    """The validation rows: ``src`` itself (any ``.jsonl`` in the release format), else ``hellaswag_val.jsonl``
    under the folder ``src``, else the one ``.jsonl`` there; ``hellaswag_train.jsonl`` beside it, if any."""
    if src.is_file():
        if src.suffix != ".jsonl":
            raise ValueError(f"--hellaswag {src}: expected a .jsonl file in HellaSwag's release format "
                             "(e.g. hellaswag_val.jsonl) or a folder holding one")  # fmt: skip
        if src.name in HS_OTHER_SPLITS:
            raise ValueError(f"--hellaswag {src}: that is HellaSwag's {HS_OTHER_SPLITS[src.name]} split; "
                             "give hellaswag_val.jsonl (or the folder holding it)")  # fmt: skip
        return {"validation.jsonl": _hellaswag_rows(src)}
    val = _find(src, "hellaswag_val.jsonl", "hellaswag", required=False)
    if val is not None:
        out = {"validation.jsonl": _hellaswag_rows(val)}
    else:
        others = sorted(p for p in src.rglob("*.jsonl") if p.name not in HS_OTHER_SPLITS and p.is_file())
        if not others:
            raise FileNotFoundError(f"--hellaswag {src}: no 'hellaswag_val.jsonl' (nor another .jsonl) under it "
                                    "(expected the hellaswag release files)")  # fmt: skip
        if len(others) > 1:
            raise ValueError(f"--hellaswag {src}: no 'hellaswag_val.jsonl' and several .jsonl files under it "
                             f"({', '.join(map(str, others[:3]))}); give --hellaswag the val file itself")  # fmt: skip
        try:
            out = {"validation.jsonl": _hellaswag_rows(others[0])}
        except ValueError as e:
            raise ValueError(f"--hellaswag {src}: no 'hellaswag_val.jsonl' under it, and its one .jsonl is not in "
                             f"HellaSwag's release format ({e})") from None  # fmt: skip
    train = _find(src, "hellaswag_train.jsonl", "hellaswag", required=False)
    if train is not None:
        out["train.jsonl"] = _hellaswag_rows(train)
    return out


def _paired(src: Path, task: str, stem: str, fields: tuple[str, ...], labels: tuple[str, ...]) -> Rows | None:
    """Questions in ``<stem>.jsonl`` + one label a line in ``<stem>-labels.lst`` (PIQA, WinoGrande)."""
    path = _find(src, f"{stem}.jsonl", task, required=False)
    if path is None:
        return None
    rows = _read_jsonl(path)
    label_path = _find(src, f"{stem}-labels.lst", task, required=False)
    if label_path is None and not all("answer" in r or "label" in r for r in rows):
        raise FileNotFoundError(f"--{task} {src}: {path.name} needs its labels file {stem}-labels.lst beside it")
    given = _read_labels(label_path, len(rows), labels) if label_path else None
    for i, row in enumerate(rows):
        _need(row, fields, _where(path, row))
        row["__label__"] = given[i] if given else str(row.get("answer", row.get("label")))
    return rows


def _piqa(src: Path) -> Files:
    out = {}
    # The data/ folder names the validation files valid.*, physicaliqa-train-dev.zip names them dev.*.
    for stem, split in (("valid", "validation"), ("dev", "validation"), ("train", "train")):
        rows = _paired(src, "piqa", stem, ("goal", "sol1", "sol2"), ("0", "1"))
        if rows is not None and f"{split}.jsonl" not in out:
            out[f"{split}.jsonl"] = [
                {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["__label__"])} for r in rows
            ]
    if "validation.jsonl" not in out:
        _find(src, "valid.jsonl", "piqa")  # raises, naming the expected file
    return out


def _winogrande(src: Path) -> Files:
    out = {}
    for stem, split in (("dev", "validation"), ("train_xl", "train")):
        rows = _paired(src, "winogrande", stem, ("sentence", "option1", "option2"), ("1", "2"))
        if rows is not None:
            keep = ("sentence", "option1", "option2")
            out[f"{split}.jsonl"] = [{**{k: r[k] for k in keep}, "answer": r["__label__"]} for r in rows]
    if "validation.jsonl" not in out:
        _find(src, "dev.jsonl", "winogrande")
    return out


def _csv_rows(path: Path, header: bool) -> list[tuple[int, dict | list]]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f) if header else csv.reader(f)
            return [(reader.line_num, row) for row in reader]
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _subject_csvs(src: Path, task: str, split_dir: str) -> dict[str, Path]:
    """``<split_dir>/<subject>_<split_dir>.csv`` files under ``src`` -> {subject: path}."""
    found: dict[str, Path] = {}
    for path in sorted(src.rglob(f"*_{split_dir}.csv")):
        if path.parent.name != split_dir:
            continue
        subject = path.name[: -len(f"_{split_dir}.csv")]
        if subject in found:
            raise ValueError(f"--{task} {src}: two files for subject {subject!r} ({found[subject]}, {path})")
        found[subject] = path
    return found


def _mmlu(src: Path) -> Files:
    out: Files = {}
    for split in ("test", "dev"):
        csvs = _subject_csvs(src, "mmlu", split)
        if not csvs:
            raise FileNotFoundError(f"--mmlu {src}: no {split}/<subject>_{split}.csv files under it (MMLU's data/)")
        for subject, path in csvs.items():
            rows = []
            for lineno, row in _csv_rows(path, header=False):
                if len(row) != 6:
                    raise ValueError(f"{path}:{lineno}: expected 6 columns (question, A, B, C, D, answer)")
                if row[5].strip() not in LETTERS:
                    raise ValueError(f"{path}:{lineno}: answer {row[5]!r} is not one of A, B, C, D")
                rows.append(
                    {
                        "question": row[0],
                        "subject": subject,
                        "choices": row[1:5],
                        "answer": LETTERS.index(row[5].strip()),
                    }
                )
            out[f"{subject}/{split}.jsonl"] = rows
    return out


def _ceval(src: Path) -> Files:
    out: Files = {}
    for split in ("val", "dev"):
        csvs = _subject_csvs(src, "ceval", split)
        if not csvs:
            raise FileNotFoundError(f"--ceval {src}: no {split}/<subject>_{split}.csv files under it (C-Eval's data)")
        for subject, path in csvs.items():
            rows = []
            for lineno, row in _csv_rows(path, header=True):
                _need(row, ("id", *FIELDS["ceval"]), f"{path}:{lineno}")
                if row["answer"].strip() not in LETTERS:
                    raise ValueError(f"{path}:{lineno}: answer {row['answer']!r} is not one of A, B, C, D")
                keep = {k: row[k] for k in FIELDS["ceval"]}
                rows.append({"id": int(row["id"]), **keep, "answer": row["answer"].strip(),
                             "explanation": row.get("explanation") or ""})  # fmt: skip
            out[f"{subject}/{split}.jsonl"] = rows
    return out


C3_HALVES = {"d": "dialogue", "m": "mixed-genre"}
# CLUE's c3_public.zip: d-dev.json, m-dev.json, d-train.json, m-train.json; github.com/nlpdata/c3: c3-d-dev.json, ...
_C3_NAME = re.compile(r"^(c3-)?([dm])-(dev|train|test)\.json$")


def _json_error(e: json.JSONDecodeError) -> str:
    """``e``'s message without its doubled "at" ("Unterminated string starting at" + " at line …")."""
    return f"{e.msg.removesuffix(' at')} at line {e.lineno} column {e.colno}"


def _c3_pair(src: Path, part: str) -> list[Path] | None:
    """C3's two halves (d, m) of ``part`` under the folder ``src``; None if neither is there; one alone is refused."""
    found = {}
    for prefix in ("", "c3-"):
        hits = {k: _find(src, f"{prefix}{k}-{part}.json", "c3", required=False) for k in "dm"}
        if any(hits.values()):
            found[prefix] = hits
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(f"{p}d-{part}.json" for p in found)
        raise ValueError(
            f"--c3 {src}: both {part} file namings under it ({names}); point --c3 at the folder holding one"
        )
    ((prefix, hits),) = found.items()
    for k, other in (("d", "m"), ("m", "d")):
        if hits[other] is None:
            raise FileNotFoundError(f"--c3 {src}: {hits[k]} is the {C3_HALVES[k]} half of C3's {part} split but "
                                    f"{prefix}{other}-{part}.json (the {C3_HALVES[other]} half) is not under it; "
                                    "a split is written whole, both halves")  # fmt: skip
    return [hits["d"], hits["m"]]


def _c3_file(src: Path) -> list[Path]:
    """One half of C3's dev split given as a file: both halves, the other one taken from beside it."""
    match = _C3_NAME.match(src.name)
    if match is None:
        raise ValueError(f"--c3 {src}: expected C3's d-dev.json or m-dev.json (CLUE; c3-d-dev.json, c3-m-dev.json "
                         "from nlpdata/c3) or the folder holding them")  # fmt: skip
    prefix, half, part = match.groups()
    if part != "dev":
        raise ValueError(f"--c3 {src}: that is C3's {part} split; give a dev file (the validation split) or the "
                         "folder holding dev and train")  # fmt: skip
    other = "m" if half == "d" else "d"
    partner = src.with_name(f"{prefix or ''}{other}-dev.json")
    if not partner.is_file():
        raise FileNotFoundError(f"--c3 {src}: that is the {C3_HALVES[half]} half of C3's dev split and its "
                                f"{C3_HALVES[other]} half {partner.name} is not beside it (the validation split is "
                                "both halves): put it there, or give the folder holding both")  # fmt: skip
    pair = [src, partner] if half == "d" else [partner, src]
    print(f"{'c3':>10}: taking both halves of the dev split: {pair[0]} ({C3_HALVES['d']}) + {pair[1]} "
          f"({C3_HALVES['m']}); give the folder to write the train split too")  # fmt: skip
    return pair


def _c3_rows(paths: list[Path]) -> Rows:
    """Question rows of the documents of ``paths`` (d, then m) in the HF ``clue``/``c3`` schema. As HF's clue
    script (``_generate_examples``: ``data = d + m``, ``for idx, entry in enumerate(data)``), ``id`` is the index of
    the document across both halves, shared by all the questions of that document."""
    rows: Rows = []
    doc_index = 0
    for path in paths:
        try:
            docs = json.loads(_read_text(path))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON, truncated or damaged? ({_json_error(e)})") from None
        for d, doc in enumerate(docs if isinstance(docs, list) else [None]):
            where = f"{path}: document {d}"
            if not (isinstance(doc, list) and len(doc) >= 2 and isinstance(doc[0], list)):
                raise ValueError(f"{where}: expected [context lines, [questions], id]")
            for q, item in enumerate(doc[1]):
                _need(item, ("question", "choice", "answer"), f"{where}, question {q}")
                if item["answer"] not in item["choice"]:
                    raise ValueError(f"{where}, question {q}: the answer is not one of its choices")
                rows.append({"id": doc_index, "context": doc[0], "question": item["question"],
                             "choice": item["choice"], "answer": item["answer"]})  # fmt: skip
            doc_index += 1
    return rows


def _c3(src: Path) -> Files:
    if src.is_file():
        return {"validation.jsonl": _c3_rows(_c3_file(src))}
    out: Files = {}
    for part, split in (("dev", "validation"), ("train", "train")):
        paths = _c3_pair(src, part)
        if paths is None:
            if part == "dev":
                raise FileNotFoundError(f"--c3 {src}: no d-dev.json + m-dev.json (or c3-d-dev.json + c3-m-dev.json) "
                                        "under it (C3's data)")  # fmt: skip
            continue
        out[f"{split}.jsonl"] = _c3_rows(paths)
    return out


def _gsm8k(src: Path) -> Files:
    out = {}
    for split in ("test", "train"):
        path = _find(src, f"{split}.jsonl", "gsm8k")
        rows = []
        for row in _read_jsonl(path):
            _need(row, FIELDS["gsm8k"], _where(path, row))
            rows.append({"question": row["question"], "answer": row["answer"]})
        out[f"{split}.jsonl"] = rows
    return out


ORIGINAL: dict[str, Callable[[Path], Files]] = {
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "piqa": _piqa,
    "mmlu": _mmlu,
    "c3": _c3,
    "ceval": _ceval,
    "gsm8k": _gsm8k,
}


# ---- Hugging Face datasets folders -------------------------------------------------------------------------------
_SHARD = re.compile(r"-\d{5}-of-\d{5}$")


def _hf_tables(src: Path) -> dict[str, dict[str, Rows]] | None:
    """{config folder: {split: rows}} of a ``datasets`` folder under ``src``, or None if it holds none."""
    import datasets

    datasets.disable_progress_bars()
    saved = sorted({p.parent for p in src.rglob("dataset_dict.json")})
    if saved:
        tables = {}
        for p in saved:
            try:
                tables[str(p.relative_to(src))] = {k: v.to_list() for k, v in datasets.load_from_disk(str(p)).items()}
            except Exception as e:  # noqa: BLE001 - whatever datasets raises for a damaged folder, named in one line
                raise _unreadable(p / "dataset_dict.json", "a datasets folder (DatasetDict.save_to_disk)", e) from None
        return tables
    files = sorted(p for p in src.rglob("*") if p.suffix in (".parquet", ".arrow") and p.is_file())
    if not files:
        return None
    configs: dict[str, dict[str, Rows]] = {}
    for path in files:
        stem = _SHARD.sub("", path.stem)
        split = stem.rsplit("-", 1)[-1] if path.suffix == ".arrow" else stem  # arrow cache: <builder>-<split>
        try:
            if path.suffix == ".parquet":
                import pyarrow.parquet as pq

                rows = pq.read_table(path).to_pylist()
            else:
                rows = datasets.Dataset.from_file(str(path)).to_list()
        except Exception as e:  # noqa: BLE001 - pyarrow's errors do not always name the file
            kind = "a Parquet file" if path.suffix == ".parquet" else "an Arrow file"
            raise _unreadable(path, f"{kind} of a datasets folder", e) from None
        configs.setdefault(str(path.parent.relative_to(src)), {}).setdefault(split, []).extend(rows)
    return configs


def _unreadable(path: Path, what: str, e: Exception) -> ValueError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, UnicodeDecodeError):
        return _not_utf8(path)
    return ValueError(f"{path}: not readable as {what} ({reason[:200].replace(str(path), '…')})")


def _from_hf(task: str, src: Path, configs: dict[str, dict[str, Rows]]) -> Files:
    splits = REQUIRED_SPLITS[task] + OPTIONAL_SPLITS.get(task, ())
    if task == "mmlu" and len(configs) > 1:  # cais/mmlu: `all` holds every subject's rows; the others repeat them
        configs = {k: v for k, v in configs.items() if Path(k).name == "all"} or configs
    if len(configs) > 1 and task not in PER_SUBJECT:
        raise ValueError(f"--{task} {src}: several datasets under it ({', '.join(sorted(configs))}); point it at one")
    out: Files = {}
    for config, tables in configs.items():
        for split in splits:
            for i, row in enumerate(tables.get(split, []), 1):
                if task == "ceval":  # ceval-exam: one config per subject, named by its folder
                    subject = Path(config).name if config != "." else src.name
                    key = f"{subject}/{split}.jsonl"
                elif task == "mmlu":
                    _need(row, ("subject",), f"{src / config} {split} row {i}")
                    key = f"{row['subject']}/{split}.jsonl"
                else:
                    key = f"{split}.jsonl"
                _need(row, FIELDS[task], f"{src / config} {split} row {i}")
                out.setdefault(key, []).append(row)
    return out


# ---- the command -------------------------------------------------------------------------------------------------
def convert(task: str, src: str | os.PathLike) -> Files:
    """Rows of ``task`` read from ``src`` (a ``datasets`` folder or the release files), checked, in memory."""
    path = Path(src)
    if not path.exists():
        raise FileNotFoundError(f"--{task} {str(path)!r} does not exist")
    if path.is_file() and task in FOLDER_ONLY:
        raise ValueError(f"--{task} {path}: expected a folder, got a file ({FOLDER_ONLY[task]})")
    if not path.is_file() and not path.is_dir():
        raise ValueError(f"--{task} {path}: neither a file nor a folder")
    configs = _hf_tables(path) if path.is_dir() else None
    files = _from_hf(task, path, configs) if configs else ORIGINAL[task](path)
    written = {key.rsplit("/", 1)[-1][: -len(".jsonl")] for key in files}
    for split in REQUIRED_SPLITS[task]:
        if split not in written:
            raise FileNotFoundError(
                f"--{task} {path}: no {split!r} split found (needs {', '.join(REQUIRED_SPLITS[task])})"
            )
    if task in PER_SUBJECT:  # every subject needs its few-shot split beside its evaluation split
        evaluated, fewshot = REQUIRED_SPLITS[task]
        for key in files:
            subject, split = key.rsplit("/", 1)
            if split == f"{evaluated}.jsonl" and f"{subject}/{fewshot}.jsonl" not in files:
                raise FileNotFoundError(f"--{task} {path}: subject {subject!r} has {evaluated} rows but no {fewshot}")
    return files


def eval_data(
    output: str = "data/eval",
    hellaswag: str | None = None,
    winogrande: str | None = None,
    piqa: str | None = None,
    mmlu: str | None = None,
    c3: str | None = None,
    ceval: str | None = None,
    gsm8k: str | None = None,
    overwrite: bool = False,
) -> dict[str, dict[str, int]]:
    """Write the benchmarks' local layout ``<output>/<task>/<split>.jsonl`` (read by ``--eval.data_dir``).

    Each ``--<task>`` takes a Hugging Face ``datasets`` folder (``save_to_disk`` output, a ``load_dataset`` cache
    folder, or a hub snapshot of parquet files) or the folder of the benchmark's original release files.

    Args:
        output: the data folder to write (one sub-folder per task; ``--eval.data_dir`` reads it).
        hellaswag: HellaSwag: ``hellaswag_val.jsonl`` (github.com/rowanz/hellaswag, data/; any ``.jsonl`` of that
            format, as the file or alone in a folder) or Rowan/hellaswag.
        winogrande: WinoGrande: ``dev.jsonl`` + ``dev-labels.lst`` (winogrande_1.1.zip) or allenai/winogrande.
        piqa: PIQA: ``valid.jsonl`` + ``valid-labels.lst`` (yonatanbisk.com/piqa) or ybisk/piqa.
        mmlu: MMLU: the extracted ``data/`` of data.tar (people.eecs.berkeley.edu/~hendrycks) or cais/mmlu (all).
        c3: C3: the folder of ``d-dev.json`` + ``m-dev.json`` (CLUE's c3_public.zip; ``c3-d-dev.json`` +
            ``c3-m-dev.json`` in github.com/nlpdata/c3, data/), one of them with the other beside it, or clue/clue (c3).
        ceval: C-Eval: ``dev/`` + ``val/`` CSVs of ceval-exam.zip or ceval/ceval-exam (a folder per subject).
        gsm8k: GSM8k: ``train.jsonl`` + ``test.jsonl`` (github.com/openai/grade-school-math) or openai/gsm8k (main).
        overwrite: replace task folders that already exist in ``output``.
    """
    given = {t: p for t, p in zip(KNOWN_TASKS, (hellaswag, winogrande, piqa, mmlu, c3, ceval, gsm8k)) if p}
    if not given:
        raise ValueError(f"eval-data: give at least one source, e.g. --gsm8k PATH (tasks: {', '.join(KNOWN_TASKS)})")
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {output!r} exists and is not a folder")
    for task in given:
        if (out / task).exists() and not overwrite:
            raise FileExistsError(f"--output {output!r}: {task}/ exists (pass --overwrite true to replace it)")
    converted = {task: convert(task, src) for task, src in given.items()}  # all checks before any write
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / f".eval-data.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for task, files in converted.items():
            for key, rows in sorted(files.items()):
                path = staging / task / key
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with path.open("w", encoding="utf-8") as f:
                        for row in rows:
                            f.write(json.dumps({k: v for k, v in row.items() if k != "__line__"}, ensure_ascii=False))
                            f.write("\n")
                except OSError as e:  # a failed write() names no file (a full disk): name the one being written
                    raise OSError(e.errno, e.strerror, str(out / task / key)) from None
        # The files written are what the task definitions read: checked by the same code as --eval.data_dir.
        from pd_lightning.eval.tasks import check_data

        check_data(staging, list(converted), check_shots=False)  # the shots are chosen when scoring
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()  # bad input leaves nothing behind
        raise
    for task in converted:
        if (out / task).exists():
            (out / task).rename(staging / f"{task}.old")
        (staging / task).rename(out / task)
    shutil.rmtree(staging, ignore_errors=True)
    summary: dict[str, dict[str, int]] = {}
    for task, files in converted.items():
        counts: dict[str, int] = {}
        for key, rows in files.items():
            split = key.rsplit("/", 1)[-1][: -len(".jsonl")]
            counts[split] = counts.get(split, 0) + len(rows)
        summary[task] = counts
        subjects = len({k.split("/")[0] for k in files}) if task in PER_SUBJECT else 0
        detail = ", ".join(f"{s} {n}" for s, n in counts.items()) + (f" ({subjects} subjects)" if subjects else "")
        print(f"{task:>10}: {detail} -> {out / task}")
        try:  # enough rows for the paper's shots? Only a note: the shots are chosen when scoring.
            check_data(out, [task])
        except ValueError as e:
            print(f"      note: {str(e).replace(' (validate:', ' when scoring (validate:')}")
    return summary
