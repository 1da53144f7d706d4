"""``pd-lightning eval-data``: each benchmark's original release format and Hugging Face ``datasets`` folders ->
``<output>/<task>/<split>.jsonl`` in the hub schema. The source files are written here by hand (invented text)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pd_lightning.cli import main


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _csv(path: Path, rows: list[list[str]], header: list[str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


HS_ROW = {
    "ind": 4,
    "activity_label": "Baking bread",
    "ctx_a": "A man kneads dough on a table.",
    "ctx_b": "he",
    "ctx": "A man kneads dough on a table. he",
    "endings": ["folds it twice.", "sings to the oven.", "paints the flour.", "throws it away."],
    "source_id": "made-up",
    "split": "val",
    "split_type": "indomain",
    "label": 0,
}


@pytest.fixture
def release(tmp_path) -> Path:
    """A folder holding all seven benchmarks in their original release formats (two rows or so each)."""
    r = tmp_path / "release"
    _jsonl(r / "hellaswag" / "data" / "hellaswag_val.jsonl", [HS_ROW, {**HS_ROW, "ind": 5, "label": 2}])
    _jsonl(r / "piqa" / "valid.jsonl", [
        {"id": "a1", "goal": "Keep soup warm", "sol1": "Cover the pot.", "sol2": "Open the window."},
        {"id": "a2", "goal": "Dry a towel", "sol1": "Put it in water.", "sol2": "Hang it in the sun."},
    ])  # fmt: skip
    (r / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    _jsonl(r / "winogrande" / "dev.jsonl", [
        {"qID": "q1", "sentence": "The cup fell off the shelf because _ was tilted.", "option1": "cup",
         "option2": "shelf", "answer": "2"},
    ])  # fmt: skip
    (r / "winogrande" / "dev-labels.lst").write_text("2\n")
    for subject in ("made_up_math", "made_up_history"):
        _csv(r / "mmlu" / "data" / "test" / f"{subject}_test.csv", [["What is two plus two?", "3", "4", "5", "6", "B"]])
        _csv(r / "mmlu" / "data" / "dev" / f"{subject}_dev.csv", [["Ten minus one?", "9", "8", "7", "6", "A"]])
    header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _csv(r / "ceval" / "val" / "made_up_law_val.csv", [["0", "一加一等于几?", "1", "2", "3", "4", "B", ""]], header)
    _csv(r / "ceval" / "dev" / "made_up_law_dev.csv", [["0", "二加二等于几?", "4", "5", "6", "7", "A", "因为"]], header)
    c3_doc = [
        ["男: 你好。", "女: 你好, 今天很冷。"],
        [{"question": "天气怎么样?", "choice": ["冷", "热"], "answer": "冷"}],
        "d1",
    ]
    (r / "c3").mkdir()
    (r / "c3" / "c3-d-dev.json").write_text(json.dumps([c3_doc], ensure_ascii=False), encoding="utf-8")
    (r / "c3" / "c3-m-dev.json").write_text(json.dumps([c3_doc, c3_doc], ensure_ascii=False), encoding="utf-8")
    gsm = {"question": "Ann has 2 pens and buys 3. How many?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}
    _jsonl(r / "gsm8k" / "grade_school_math" / "data" / "test.jsonl", [gsm])
    _jsonl(r / "gsm8k" / "grade_school_math" / "data" / "train.jsonl", [gsm, gsm])
    return r


def _all_flags(release: Path) -> list[str]:
    return [x for t in ("hellaswag", "winogrande", "piqa", "mmlu", "c3", "ceval", "gsm8k")
            for x in (f"--{t}", str(release / t))]  # fmt: skip


def test_original_release_files(tmp_path, release, capsys):
    out = tmp_path / "evaldata"
    main(["eval-data", "--output", str(out), *_all_flags(release)])
    hs = _read(out / "hellaswag" / "validation.jsonl")
    assert [r["label"] for r in hs] == ["0", "2"] and hs[0]["endings"] == HS_ROW["endings"]
    assert hs[0]["ctx"] == HS_ROW["ctx"] and hs[0]["activity_label"] == "Baking bread"
    assert _read(out / "piqa" / "validation.jsonl") == [
        {"goal": "Keep soup warm", "sol1": "Cover the pot.", "sol2": "Open the window.", "label": 0},
        {"goal": "Dry a towel", "sol1": "Put it in water.", "sol2": "Hang it in the sun.", "label": 1},
    ]
    assert _read(out / "winogrande" / "validation.jsonl") == [
        {"sentence": "The cup fell off the shelf because _ was tilted.", "option1": "cup", "option2": "shelf",
         "answer": "2"}
    ]  # fmt: skip
    assert _read(out / "mmlu" / "made_up_math" / "test.jsonl") == [
        {"question": "What is two plus two?", "subject": "made_up_math", "choices": ["3", "4", "5", "6"], "answer": 1}
    ]
    assert _read(out / "mmlu" / "made_up_history" / "dev.jsonl")[0]["answer"] == 0
    assert _read(out / "ceval" / "made_up_law" / "val.jsonl") == [
        {"id": 0, "question": "一加一等于几?", "A": "1", "B": "2", "C": "3", "D": "4", "answer": "B", "explanation": ""}
    ]
    assert _read(out / "ceval" / "made_up_law" / "dev.jsonl")[0]["explanation"] == "因为"
    c3 = _read(out / "c3" / "validation.jsonl")
    assert len(c3) == 3 and [r["id"] for r in c3] == [0, 1, 2]
    assert c3[0] == {"id": 0, "context": ["男: 你好。", "女: 你好, 今天很冷。"], "question": "天气怎么样?",
                     "choice": ["冷", "热"], "answer": "冷"}  # fmt: skip
    assert len(_read(out / "gsm8k" / "train.jsonl")) == 2
    assert _read(out / "gsm8k" / "test.jsonl")[0]["answer"].endswith("#### 5")
    printed = capsys.readouterr().out
    assert "mmlu: test 2, dev 2 (2 subjects)" in printed
    # Written all the same, with a note that the paper's 5 / 8 shots need more rows than these tiny releases hold.
    notes = [line.strip() for line in printed.splitlines() if line.strip().startswith("note:")]
    tail = "it has 2; add rows, or lower num_fewshot for gsm8k when scoring (validate: --eval.num_fewshot '{gsm8k: N}')"
    assert any(n.startswith("note: gsm8k: 8-shot needs 8 rows in") and n.endswith(tail) for n in notes), notes
    assert any(n.startswith("note: mmlu: 5-shot needs 5 dev rows per subject") for n in notes), notes
    assert not list(out.glob(".*"))  # no temporary folder left behind


def test_hf_datasets_folders(tmp_path, monkeypatch):
    """save_to_disk folders, a load_dataset cache (``<builder>-<split>.arrow``) and hub parquet files."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    piqa = [{"goal": "g1", "sol1": "a", "sol2": "b", "label": 1}]
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(piqa)}).save_to_disk(str(tmp_path / "piqa_saved"))
    gsm_files = {s: str(_jsonl(tmp_path / "gsm_src" / f"{s}.jsonl", [{"question": s, "answer": "#### 1"}]))
                 for s in ("train", "test")}  # fmt: skip
    datasets.load_dataset("json", data_files=gsm_files, cache_dir=str(tmp_path / "gsm_cache"))
    assert list((tmp_path / "gsm_cache").rglob("*-test.arrow"))  # the datasets cache layout is what we read
    rows = [{"question": "q", "subject": "made_up_a", "choices": ["1", "2", "3", "4"], "answer": 3},
            {"question": "r", "subject": "made_up_b", "choices": ["1", "2", "3", "4"], "answer": 0}]  # fmt: skip
    snap = tmp_path / "hub" / "datasets--x--mmlu" / "snapshots" / "abc123" / "all"
    snap.mkdir(parents=True)
    for split in ("test", "dev"):
        pq.write_table(pa.Table.from_pylist(rows), snap / f"{split}-00000-of-00001.parquet")
        # cais/mmlu also has one config per subject, repeating rows of `all`: read once, from `all`.
        (snap.parent / "made_up_a").mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows[:1]), snap.parent / "made_up_a" / f"{split}-00000-of-00001.parquet")

    out = tmp_path / "evaldata"
    main(["eval-data", "--output", str(out), "--piqa", str(tmp_path / "piqa_saved"),
          "--gsm8k", str(tmp_path / "gsm_cache"), "--mmlu", str(snap.parent)])  # fmt: skip
    assert _read(out / "piqa" / "validation.jsonl") == piqa
    assert _read(out / "gsm8k" / "test.jsonl") == [{"question": "test", "answer": "#### 1"}]
    assert _read(out / "mmlu" / "made_up_b" / "dev.jsonl") == [rows[1]]
    assert _read(out / "mmlu" / "made_up_a" / "test.jsonl") == [rows[0]]  # once, not twice


def _fails(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(["eval-data", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pd-lightning: error:") and len(err.splitlines()) == 1, err
    return err


def test_bad_input_writes_nothing(tmp_path, release, capsys):
    out = tmp_path / "evaldata"
    flags = _all_flags(release)
    # A row missing a field: file and line.
    bad = release / "gsm8k" / "grade_school_math" / "data" / "test.jsonl"
    bad.write_text(bad.read_text() + json.dumps({"question": "no answer"}) + "\n")
    err = _fails(capsys, ["--output", str(out), *flags])
    assert f"{bad}:2: missing field 'answer'" in err and not out.exists()
    bad.write_text(bad.read_text().splitlines()[0] + "\n")
    # Labels file of the wrong length; a missing labels file; a missing release file.
    (release / "piqa" / "valid-labels.lst").write_text("0\n")
    assert "1 labels for 2 rows" in _fails(capsys, ["--output", str(out), *flags])
    (release / "piqa" / "valid-labels.lst").unlink()
    assert "valid-labels.lst" in _fails(capsys, ["--output", str(out), "--piqa", str(release / "piqa")])
    # physicaliqa-train-dev.zip names them dev.jsonl + dev-labels.lst.
    (release / "piqa" / "valid.jsonl").rename(release / "piqa" / "dev.jsonl")
    (release / "piqa" / "dev-labels.lst").write_text("1\n0\n")
    main(["eval-data", "--output", str(tmp_path / "zip"), "--piqa", str(release / "piqa")])
    assert [r["label"] for r in _read(tmp_path / "zip" / "piqa" / "validation.jsonl")] == [1, 0]
    assert "'hellaswag_val.jsonl'" in _fails(capsys, ["--output", str(out), "--hellaswag", str(release / "piqa")])
    assert "does not exist" in _fails(capsys, ["--output", str(out), "--c3", str(tmp_path / "nope")])
    # A bad MMLU answer letter; a C-Eval subject without its few-shot split.
    _csv(release / "mmlu" / "data" / "test" / "made_up_x_test.csv", [["q", "1", "2", "3", "4", "E"]])
    assert "made_up_x_test.csv:1: answer 'E'" in _fails(capsys, ["--output", str(out), "--mmlu", str(release / "mmlu")])
    (release / "ceval" / "dev" / "made_up_law_dev.csv").unlink()
    assert "no dev" in _fails(capsys, ["--output", str(out), "--ceval", str(release / "ceval")])
    assert not out.exists()
    # An existing task folder is kept unless --overwrite true.
    main(["eval-data", "--output", str(out), "--c3", str(release / "c3")])
    before = (out / "c3" / "validation.jsonl").read_text()
    assert "--overwrite true" in _fails(capsys, ["--output", str(out), "--c3", str(release / "c3")])
    assert (out / "c3" / "validation.jsonl").read_text() == before
    main(["eval-data", "--output", str(out), "--c3", str(release / "c3"), "--overwrite", "true"])
    assert (out / "c3" / "validation.jsonl").read_text() == before


def test_hellaswag_any_release_jsonl_file_or_its_folder(tmp_path, capsys):
    """Any ``.jsonl`` in HellaSwag's release format, given as a file or alone in a folder, is the validation split."""
    src = _jsonl(tmp_path / "dl" / "hs-dev-copy.jsonl", [HS_ROW, {**HS_ROW, "ind": 5, "label": 3}])
    main(["eval-data", "--output", str(tmp_path / "a"), "--hellaswag", str(src)])
    assert [r["label"] for r in _read(tmp_path / "a" / "hellaswag" / "validation.jsonl")] == ["0", "3"]
    main(["eval-data", "--output", str(tmp_path / "b"), "--hellaswag", str(src.parent)])  # the one .jsonl in it
    assert len(_read(tmp_path / "b" / "hellaswag" / "validation.jsonl")) == 2
    # The release names keep working: hellaswag_val.jsonl (+ hellaswag_train.jsonl) in a folder, or the val file.
    rel = tmp_path / "rel"
    _jsonl(rel / "hellaswag_val.jsonl", [HS_ROW])
    _jsonl(rel / "hellaswag_train.jsonl", [HS_ROW, HS_ROW, HS_ROW])
    main(["eval-data", "--output", str(tmp_path / "c"), "--hellaswag", str(rel)])
    assert len(_read(tmp_path / "c" / "hellaswag" / "train.jsonl")) == 3
    main(["eval-data", "--output", str(tmp_path / "d"), "--hellaswag", str(rel / "hellaswag_val.jsonl")])
    assert len(_read(tmp_path / "d" / "hellaswag" / "validation.jsonl")) == 1
    capsys.readouterr()
    out = tmp_path / "bad"
    # Refused in one line: the train file as the evaluation split, a file of another kind, an ambiguous folder,
    # a .jsonl of another format.
    err = _fails(capsys, ["--output", str(out), "--hellaswag", str(rel / "hellaswag_train.jsonl")])
    assert "--hellaswag" in err and "train split" in err
    (tmp_path / "notes.txt").write_text("x")
    err = _fails(capsys, ["--output", str(out), "--hellaswag", str(tmp_path / "notes.txt")])
    assert "--hellaswag" in err and "expected a .jsonl file" in err
    _jsonl(src.parent / "other.jsonl", [HS_ROW])
    assert "several .jsonl files" in _fails(capsys, ["--output", str(out), "--hellaswag", str(src.parent)])
    wrong = _jsonl(tmp_path / "wrong.jsonl", [{"goal": "g", "sol1": "a", "sol2": "b"}])
    assert f"{wrong}:1: missing field 'ctx_a'" in _fails(capsys, ["--output", str(out), "--hellaswag", str(wrong)])
    assert not out.exists()


@pytest.mark.parametrize("task", ["winogrande", "piqa", "mmlu", "ceval", "gsm8k"])
def test_a_file_where_a_folder_is_expected(tmp_path, release, capsys, task):
    """One line naming the flag and what it expects (it was a traceback: 'NoneType' object has no attribute 'open')."""
    out = tmp_path / "evaldata"
    some_file = next(p for p in sorted((release / task).rglob("*")) if p.is_file())
    err = _fails(capsys, ["--output", str(out), f"--{task}", str(some_file)])
    assert f"--{task} {some_file}: expected a folder" in err, err
    assert not out.exists()


def _c3_docs(n_docs: int, questions: int = 1, tag: str = "d") -> list:
    def qs(i: int) -> list[dict]:
        return [
            {"question": f"{tag}{i} 问题{q}？", "choice": ["甲", "乙", "丙"], "answer": "乙"} for q in range(questions)
        ]

    return [[[f"{tag}{i} 男：你好。", f"{tag}{i} 女：你好。"], qs(i), f"{tag}{i}"] for i in range(n_docs)]


def _c3_write(folder: Path, name: str, docs: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")
    return folder / name


def test_c3_both_halves_and_hf_ids(tmp_path, capsys):
    """C3's dialogue (d) and mixed-genre (m) halves are written together, in HF ``clue``/``c3`` order (d, then m),
    ``id`` being the document's index across the split (HF's clue script: shared by the questions of a document)."""
    clue = tmp_path / "c3_public"  # CLUE's c3_public.zip names
    _c3_write(clue, "d-dev.json", _c3_docs(2, questions=2, tag="d"))
    _c3_write(clue, "m-dev.json", _c3_docs(1, questions=3, tag="m"))
    _c3_write(clue, "d-train.json", _c3_docs(1, tag="d"))
    _c3_write(clue, "m-train.json", _c3_docs(2, tag="m"))
    main(["eval-data", "--output", str(tmp_path / "a"), "--c3", str(clue)])
    val = _read(tmp_path / "a" / "c3" / "validation.jsonl")
    assert [r["id"] for r in val] == [0, 0, 1, 1, 2, 2, 2]
    assert [r["question"] for r in val][:3] == ["d0 问题0？", "d0 问题1？", "d1 问题0？"]
    assert val[4]["context"] == ["m0 男：你好。", "m0 女：你好。"] and val[4]["answer"] == "乙"
    assert [r["id"] for r in _read(tmp_path / "a" / "c3" / "train.jsonl")] == [0, 1, 2]
    # One half given as a file: the other one beside it is taken too, and said so.
    capsys.readouterr()
    main(["eval-data", "--output", str(tmp_path / "b"), "--c3", str(clue / "d-dev.json")])
    printed = capsys.readouterr().out
    assert "c3: taking both halves of the dev split" in printed and str(clue / "m-dev.json") in printed
    assert _read(tmp_path / "b" / "c3" / "validation.jsonl") == val
    assert not (tmp_path / "b" / "c3" / "train.jsonl").exists()  # the file names the split: give the folder for more
    nlp = tmp_path / "nlpdata"  # github.com/nlpdata/c3 names
    _c3_write(nlp, "c3-m-dev.json", _c3_docs(1, questions=3, tag="m"))
    _c3_write(nlp, "c3-d-dev.json", _c3_docs(2, questions=2, tag="d"))
    main(["eval-data", "--output", str(tmp_path / "c"), "--c3", str(nlp / "c3-m-dev.json")])
    assert _read(tmp_path / "c" / "c3" / "validation.jsonl") == val  # still d first, then m


def test_c3_half_alone_is_refused(tmp_path, capsys):
    out = tmp_path / "evaldata"
    half = _c3_write(tmp_path / "c3", "c3-d-dev.json", _c3_docs(2))
    err = _fails(capsys, ["--output", str(out), "--c3", str(half)])
    assert "--c3" in err and "c3-m-dev.json" in err and "mixed-genre" in err, err
    err = _fails(capsys, ["--output", str(out), "--c3", str(half.parent)])
    assert "c3-m-dev.json" in err and "half" in err, err
    _c3_write(tmp_path / "c3", "c3-m-dev.json", _c3_docs(2))
    _c3_write(tmp_path / "c3", "c3-m-train.json", _c3_docs(2))  # train without its dialogue half
    err = _fails(capsys, ["--output", str(out), "--c3", str(half.parent)])
    assert "c3-d-train.json" in err and "dialogue" in err, err
    err = _fails(capsys, ["--output", str(out), "--c3", str(tmp_path / "c3" / "c3-m-train.json")])
    assert "--c3" in err and "dev" in err, err
    other = _c3_write(tmp_path / "x", "dev_0.json", _c3_docs(1))
    assert "--c3" in _fails(capsys, ["--output", str(out), "--c3", str(other)])
    assert not out.exists()


def test_c3_truncated_json_names_the_file(tmp_path, capsys):
    folder = tmp_path / "c3"
    _c3_write(folder, "c3-d-dev.json", _c3_docs(1))
    bad = _c3_write(folder, "c3-m-dev.json", _c3_docs(1))
    bad.write_text(bad.read_text(encoding="utf-8")[:12], encoding="utf-8")  # cut inside a string
    err = _fails(capsys, ["--output", str(tmp_path / "out"), "--c3", str(folder)])
    assert f"{bad}: not valid JSON" in err and "at at" not in err and "line 1 column" in err, err


# ---- issue item 13: random bytes and a full disk name the file --------------------------------------------------
RANDOM = bytes(range(128, 256)) * 20  # not UTF-8 from the first byte (0x80 is a continuation byte)


@pytest.mark.parametrize(
    ("task", "file"),
    [
        ("hellaswag", "hellaswag/data/hellaswag_val.jsonl"),
        ("gsm8k", "gsm8k/grade_school_math/data/test.jsonl"),
        ("winogrande", "winogrande/dev.jsonl"),
        ("piqa", "piqa/valid-labels.lst"),
        ("mmlu", "mmlu/data/test/made_up_math_test.csv"),
        ("ceval", "ceval/val/made_up_law_val.csv"),
        ("c3", "c3/c3-m-dev.json"),
    ],
)
def test_random_bytes_name_the_file(tmp_path, release, capsys, task, file):
    """Was: `'utf-8' codec can't decode byte 0x84 in position 0` without the file."""
    (release / file).write_bytes(b"ok\n" + RANDOM)
    err = _fails(capsys, ["--output", str(tmp_path / "out"), f"--{task}", str(release / task)])
    assert str(release / file) in err and "not UTF-8 text" in err and "line 2" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["gsm8k-test.arrow", "dataset_dict.json", "test-00000-of-00001.parquet"])
def test_random_bytes_in_a_datasets_folder_name_the_file(tmp_path, capsys, name):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / name).write_bytes(RANDOM)
    err = _fails(capsys, ["--output", str(tmp_path / "out"), "--gsm8k", str(tmp_path / "hf")])
    assert str(tmp_path / "hf" / name) in err, err
    assert not (tmp_path / "out").exists()


def test_a_full_disk_names_the_file(tmp_path, release, capsys):
    """Was: `cannot write: no space left on device` without the path. A real full disk: a small tmpfs."""
    import os
    import subprocess

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here ({proc.stderr.decode().strip()[:100]})")
    try:
        rows = [{"question": f"Question {i}: " + "words " * 50, "answer": "#### 1"} for i in range(200)]
        _jsonl(release / "gsm8k" / "grade_school_math" / "data" / "test.jsonl", rows)  # ~70 kB > 64 kB
        err = _fails(capsys, ["--output", str(mnt / "out"), "--gsm8k", str(release / "gsm8k")])
        assert f"cannot write '{mnt / 'out' / 'gsm8k' / 'test.jsonl'}'" in err, err
        assert "no space left on device" in err
        assert not os.listdir(mnt), "the partial output was left behind"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
