"""``pd-lightning validate --ckpt_path … --eval.tasks …``: benchmark scores of a checkpoint, the table, the results JSON
and markdown, Δ% against a baseline, and the refusals of bad input (nothing written)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from pd_lightning.cli import main
from pd_lightning.eval.report import markdown_table, text_table, with_deltas, write_results
from tests.test_train import tiny_fit_args

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TASKS = ["hellaswag", "winogrande", "piqa", "mmlu", "c3", "ceval", "gsm8k"]


def test_delta_pct_against_a_hand_made_baseline(tmp_path):
    summary = with_deltas({"piqa": 60.0, "mmlu": 30.0}, 45.0, {"piqa": 50.0, "mmlu": 40.0, "c3": 1.0})
    # Hand-computed: (60-50)/50 = +20 %, (30-40)/40 = -25 %; averages 45 vs (50+40)/2 = 45 -> 0 %.
    assert summary["delta_pct"] == {"piqa": 20.0, "mmlu": -25.0, "average": 0.0}
    assert summary["baseline_average"] == 45.0 and "c3" not in summary["baseline"]
    # A zero baseline: the relative change is undefined -> None (strict JSON) and "n/a" in the tables, not "+nan".
    zero = with_deltas({"piqa": 1.0, "mmlu": 30.0}, 15.5, {"piqa": 0.0, "mmlu": 40.0})
    assert zero["delta_pct"]["piqa"] is None and zero["delta_pct"]["mmlu"] == -25.0
    assert text_table(zero).splitlines()[3].split() == ["Δ%", "n/a", "-25.00", "-22.50"]
    assert markdown_table(zero).splitlines()[-1] == "| Δ% | n/a | -25.00 | -22.50 |"
    zero["results"] = {"piqa": {"acc,none": 1.0, "acc_stderr,none": math.nan}}  # lm-eval's stderr of 1 document

    def strict(name):
        raise ValueError(f"{name} is not JSON")

    json_path, _ = write_results(zero, tmp_path / "r.json")
    written = json.loads(json_path.read_text(), parse_constant=strict)
    assert written["delta_pct"]["piqa"] is None and written["results"]["piqa"]["acc_stderr,none"] is None
    table = text_table(summary).splitlines()
    assert table[0].split() == ["piqa", "mmlu", "average"]
    assert table[3].split() == ["Δ%", "+20.00", "-25.00", "+0.00"]
    assert markdown_table(summary).splitlines()[0] == "| model | piqa | mmlu | average |"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, prepared) -> Path:
    """A tiny student trained 2 steps on the prepared tokens; its last checkpoint."""
    root = tmp_path_factory.mktemp("tiny_ckpt")
    main(tiny_fit_args(prepared["tokens"], root, 2, "--trainer.limit_val_batches", "0"))
    return next(root.rglob("*.ckpt"))


def _validate_args(prepared, root: Path, ckpt: Path, *extra: str) -> list[str]:
    args = tiny_fit_args(prepared["tokens"], root, 2, "--trainer.limit_val_batches", "2")
    args[0] = "validate"
    return [*args, "--ckpt_path", str(ckpt), *extra]


def _eval_args(data_dir: Path, out: Path, *tasks: str) -> list[str]:
    return ["--eval.tasks", json.dumps(list(tasks or TASKS)), "--eval.data_dir", str(data_dir),
            "--eval.limit", "2", "--eval.max_gen_toks", "8", "--eval.output", str(out)]  # fmt: skip


def test_validate_scores_all_seven_tasks(tmp_path, prepared, tiny_ckpt, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "res" / "student.json"
    main(_validate_args(prepared, tmp_path / "v", tiny_ckpt, *_eval_args(FIXTURES, out)))
    printed, err = capsys.readouterr()
    assert "Generating" not in err  # no `datasets` bar per split while lm-eval loads the JSONL files
    assert "val/loss" in printed  # the held-out loss as before
    assert "validate  val/loss" in printed and "step      0" not in printed  # not the fit's "step N" line at step 0
    header = next(line for line in printed.splitlines() if "hellaswag" in line and "average" in line)
    assert header.split() == [*TASKS, "average"]
    result = json.loads(out.read_text())
    assert set(result["scores"]) == set(TASKS) and "val/loss" in result
    assert result["step"] == 2  # the checkpoint's optimizer step (validate's own trainer counts none)
    assert all(0.0 <= result["scores"][t] <= 100.0 for t in TASKS)
    assert result["average"] == pytest.approx(sum(result["scores"].values()) / 7)
    assert out.with_suffix(".md").read_text().startswith("| model | hellaswag |")

    # Against a hand-made baseline: Δ% per task and of the average.
    baseline = {t: 10.0 + i for i, t in enumerate(TASKS)}
    (tmp_path / "base.json").write_text(json.dumps({"scores": baseline}))
    out2 = tmp_path / "res" / "vs_base.json"
    main(_validate_args(prepared, tmp_path / "v2", tiny_ckpt, *_eval_args(FIXTURES, out2),
                        "--eval.baseline", str(tmp_path / "base.json")))  # fmt: skip
    again = json.loads(out2.read_text())
    assert again["scores"] == result["scores"]  # deterministic
    for t in TASKS:
        assert again["delta_pct"][t] == pytest.approx(100 * (result["scores"][t] - baseline[t]) / baseline[t])
    base_avg = sum(baseline.values()) / 7
    assert again["delta_pct"]["average"] == pytest.approx(100 * (result["average"] - base_avg) / base_avg)
    assert "Δ%" in capsys.readouterr().out


def _fails(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pd-lightning: error:") and len(err.splitlines()) == 1, err
    return err


def test_validate_refuses_bad_input(tmp_path, prepared, tiny_ckpt, capsys, hf_teacher):
    out = tmp_path / "res" / "r.json"
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    root = tmp_path / "v"

    def run(*extra: str, ckpt: Path = tiny_ckpt, tasks: tuple[str, ...] = ("piqa",)) -> str:
        return _fails(capsys, _validate_args(prepared, root, ckpt, *_eval_args(data, out, *tasks), *extra))

    assert "unknown task 'nope'" in run(tasks=("nope",)) and "hellaswag" in run(tasks=("nope",))
    assert "--ckpt_path" in run(ckpt=tmp_path / "missing.ckpt")
    shutil.rmtree(data / "piqa")
    err = run()
    assert "piqa" in err and str(data / "piqa") in err
    shutil.copytree(FIXTURES / "piqa", data / "piqa")
    rows = (data / "piqa" / "validation.jsonl").read_text().splitlines()
    broken = json.loads(rows[1])
    del broken["sol2"]
    (data / "piqa" / "validation.jsonl").write_text("\n".join([rows[0], json.dumps(broken), *rows[2:]]) + "\n")
    err = run()
    assert "validation.jsonl" in err and ":2" in err and "sol2" in err
    shutil.copytree(FIXTURES / "piqa", data / "piqa", dirs_exist_ok=True)
    assert "baseline" in run("--eval.baseline", str(tmp_path / "nope.json"))
    # Shots and limits that lm-eval would fail on late (after the validation loop) or silently truncate.
    assert run("--eval.num_fewshot", "-1").endswith("--eval.num_fewshot must be >= 0, got -1")
    assert "--eval.limit must be a number of documents" in run("--eval.limit", "2.5")
    assert "--eval.limit" in run("--eval.limit", "0")
    lines = (data / "gsm8k" / "train.jsonl").read_text().splitlines(keepends=True)
    (data / "gsm8k" / "train.jsonl").write_text("".join(lines[:3]))
    assert "gsm8k: 8-shot needs 8 rows in" in run(tasks=("gsm8k",))
    assert "--eval.num_fewshot: unknown task 'arc'" in run("--eval.num_fewshot", "{arc: 2}")
    # --eval options without --eval.tasks were silently ignored (no scores, no file): refused instead.
    err = _fails(
        capsys, _validate_args(prepared, root, tiny_ckpt, "--eval.baseline", "b.json", "--eval.output", str(out))
    )
    assert err.startswith("pd-lightning: error: --eval.baseline, --eval.output given without --eval.tasks;")
    assert not out.exists()
    # Shots per task: the 3 train rows are enough for 3-shot GSM8k; the other tasks keep the paper's defaults.
    main(_validate_args(prepared, root, tiny_ckpt, *_eval_args(data, out, "gsm8k", "piqa"),
                        "--eval.num_fewshot", "{gsm8k: 3}"))  # fmt: skip
    assert json.loads(out.read_text())["config"]["num_fewshot"] == {"gsm8k": 3, "piqa": 0}
    # That result as the baseline of a run with other shots: scored, with one warning line per differing setting.
    base = out.replace(tmp_path / "base_cfg.json")
    out.with_suffix(".md").unlink()
    capsys.readouterr()
    main(_validate_args(prepared, root, tiny_ckpt, *_eval_args(data, out, "gsm8k", "piqa"),
                        "--eval.num_fewshot", "{gsm8k: 2}", "--eval.baseline", str(base)))  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pd-lightning: warning:")]
    assert warnings == [f"pd-lightning: warning: --eval.baseline {str(base)!r} scored gsm8k 3-shot, this run 2-shot; "
                        "its Δ% compares different settings"]  # fmt: skip
    out.unlink()
    out.with_suffix(".md").unlink()
    shutil.copytree(FIXTURES / "gsm8k", data / "gsm8k", dirs_exist_ok=True)
    # A tokenizer other than the checkpoint's: the tiny HF teacher folder holds the same tokenizer, so train another.
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel()
    other.train_from_iterator(["a different corpus entirely"] * 5, trainers.BpeTrainer(vocab_size=300))
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<|endoftext|>").save_pretrained(tmp_path / "tok")
    assert "--eval.tokenizer" in run("--eval.tokenizer", str(tmp_path / "tok"))
    assert not out.exists() and not out.with_suffix(".md").exists()
    assert not root.exists() or not list(root.rglob("*.json"))


def test_validate_refuses_before_any_scoring_what_would_fail_late(tmp_path, prepared, tiny_ckpt, capsys):
    """Found by a new-user trial: each of these ran the held-out pass (or all the scoring) before failing, with a
    bare Python error or none at all. Now: one line naming the flag or the file and line, exit 2, nothing written."""
    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    root = tmp_path / "v"
    out = tmp_path / "res" / "r.json"

    def run(*extra: str, tasks: tuple[str, ...] = ("gsm8k",), output: Path = out) -> str:
        return _fails(capsys, _validate_args(prepared, root, tiny_ckpt, *_eval_args(data, output, *tasks), *extra))

    (tmp_path / "afile").write_text("x")
    assert "--eval.output" in run(output=tmp_path / "afile" / "x.json") and "is a file" in run(
        output=tmp_path / "afile" / "x.json"
    )
    # 4,096 = the declared length of a 64-token student: no room for the prompt (lm-eval's hf model refuses it too)
    assert "--eval.max_gen_toks 4096 leaves no room for the prompt" in run("--eval.max_gen_toks", "4096")
    assert run("--eval.max_gen_toks", "0").endswith("--eval.max_gen_toks must be >= 1, got 0")
    assert run("--eval.batch_size", "0").endswith("--eval.batch_size must be >= 1, got 0")
    # Row values a task cannot map to its choices: named by file and line before any work.
    for task, split, key, value, says in (
        ("mmlu", "test.jsonl", "answer", 9, "answer 9 must be 0-3"),
        ("c3", "validation.jsonl", "answer", "不在选项里", "is not one of its choices"),
        ("c3", "validation.jsonl", "context", "男：他把自行车借给了我。", "context must be a list of strings"),
    ):
        path = data / task / split
        rows = path.read_text(encoding="utf-8").splitlines()
        row = json.loads(rows[0])
        row[key] = value
        path.write_text("\n".join([json.dumps(row, ensure_ascii=False), *rows[1:]]) + "\n", encoding="utf-8")
        err = run(tasks=(task,))
        assert f"{path}:1: {task} row: " in err and says in err, err
        shutil.copytree(FIXTURES / task, data / task, dirs_exist_ok=True)
    ceval = data / "ceval" / "high_school_physics" / "val.jsonl"
    rows = ceval.read_text(encoding="utf-8").splitlines()
    ceval.write_text("\n".join([rows[0].replace('"answer": "', '"answer": "E'), *rows[1:]]) + "\n", encoding="utf-8")
    assert "must be one of A, B, C, D" in run(tasks=("ceval",))
    shutil.copytree(FIXTURES / "ceval", data / "ceval", dirs_exist_ok=True)
    (data / "mmlu" / "dev.jsonl").write_text('{"question": "unterminated\n', encoding="utf-8")
    err = run(tasks=("mmlu",))
    assert "dev.jsonl:1: not valid JSON (" in err and " at column " in err and "at at" not in err
    shutil.copytree(FIXTURES / "mmlu", data / "mmlu", dirs_exist_ok=True)
    assert "is a file, not a folder" in _fails(
        capsys, _validate_args(prepared, root, tiny_ckpt, *_eval_args(data / "piqa" / "validation.jsonl", out, "piqa"))
    )
    assert not out.exists() and (not root.exists() or not list(root.rglob("*.json")))


def test_scoring_modules_do_not_import_each_other():
    """The callback and validate share their pieces through pd_lightning.eval.scoring: neither imports the other."""
    import ast

    import pd_lightning.eval as pkg

    root = Path(pkg.__file__).parent

    def imported(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return mods | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert "pd_lightning.eval.validate" not in imported("callback")
    assert "pd_lightning.eval.callback" not in imported("validate")
    assert "pd_lightning.eval.scoring" in imported("callback") and "pd_lightning.eval.scoring" in imported("validate")
