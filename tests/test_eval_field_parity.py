"""The scores ``pd-lightning validate`` prints are the field's: equal, task by task and metric by metric, to lm-eval's
own ``hf`` model on the ``export-hf`` folder of the same checkpoint, with lm-eval's built-in task YAMLs pointed at
the same files, at the paper's shots, and with no length or other flag set on either side.

The data (``tests/fixtures/eval_real``, written by ``tests/fixtures/make_eval_real.py``) has the real layouts and
lengths: MMLU's dev split with all 57 subjects and a test split with 3, C-Eval in both layouts at once, C3 with list
contexts, 2/3/4-option rows and a prompt past 4,096 tokens, 8-shot GSM8k prompts of ~2,000+ tokens; the student was
trained on 64-token sequences, so most requests are longer than its training length.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from tests.eval_fixtures import ALL_TASKS, eval_ckpt  # noqa: F401  (fixture)

REAL = Path(__file__).parent / "fixtures" / "eval_real"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _reference_tasks(out: Path) -> None:
    """lm-eval's own task YAMLs (``include:``), only the data source changed to the fixture files; C3, which lm-eval
    lacks, from the project's definition (the only one there is)."""
    import lm_eval.tasks

    lm = Path(lm_eval.tasks.__file__).parent
    j = lambda files: {"dataset_path": "json", "dataset_name": None,  # noqa: E731
                       "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}}}  # fmt: skip
    simple = {
        "hellaswag": ("hellaswag/hellaswag.yaml", {"validation": REAL / "hellaswag/validation.jsonl"}, {}),
        "winogrande": ("winogrande/default.yaml", {"validation": REAL / "winogrande/validation.jsonl"}, {}),
        "piqa": ("piqa/piqa.yaml", {"validation": REAL / "piqa/validation.jsonl"}, {}),
        "gsm8k": ("gsm8k/gsm8k.yaml", {"test": REAL / "gsm8k/test.jsonl", "train": REAL / "gsm8k/train.jsonl"},
                  {"num_fewshot": 8}),  # the paper's 8 shots (lm-eval's YAML says 5)
    }  # fmt: skip
    for task, (include, files, extra) in simple.items():
        cfg = {"include": str(lm / include), "task": task, **j(files), "training_split": None, **extra}
        if task == "gsm8k":
            cfg["training_split"] = "train"
        (out / f"{task}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
    # MMLU: one lm-eval subtask per subject that has test rows, shots from that subject's dev rows.
    test, dev = _rows(REAL / "mmlu/test.jsonl"), _rows(REAL / "mmlu/dev.jsonl")
    names = []
    for subject in sorted({r["subject"] for r in test}):
        files = {
            "test": _write_jsonl(out / "data" / subject / "test.jsonl", [r for r in test if r["subject"] == subject]),
            "dev": _write_jsonl(out / "data" / subject / "dev.jsonl", [r for r in dev if r["subject"] == subject]),
        }
        cfg = {"include": str(lm / f"mmlu/default/mmlu_{subject}.yaml"), **j(files), "num_fewshot": 5, "tag": []}
        (out / f"mmlu_{subject}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
        names.append(f"mmlu_{subject}")
    group = {"group": "mmlu", "task": names, "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]}
    (out / "_mmlu.yaml").write_text(yaml.safe_dump(group))
    # C-Eval: the per-subject folders (what the release's layout is), each through lm-eval's ceval-valid_<subject>.
    names = []
    for folder in sorted(p for p in (REAL / "ceval").iterdir() if p.is_dir()):
        files = {"val": folder / "val.jsonl", "dev": folder / "dev.jsonl"}
        cfg = {"include": str(lm / f"ceval/ceval-valid_{folder.name}.yaml"), **j(files), "num_fewshot": 5, "tag": []}
        (out / f"ceval_{folder.name}.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))
        names.append(f"ceval-valid_{folder.name}")
    group = {"group": "ceval", "task": names,
             "aggregate_metric_list": [{"metric": m, "weight_by_size": True} for m in ("acc", "acc_norm")]}  # fmt: skip
    (out / "_ceval.yaml").write_text(yaml.safe_dump(group))
    c3 = yaml.safe_load((Path(__file__).parents[1] / "evaluation/tasks/c3.yaml").read_text(encoding="utf-8"))
    c3.pop("pd_lightning")
    c3.update(j({"validation": REAL / "c3/validation.jsonl", "train": REAL / "c3/train.jsonl"}))
    c3.update({"training_split": "train", "fewshot_split": "train", "num_fewshot": 5})
    (out / "c3.yaml").write_text(yaml.safe_dump(c3, allow_unicode=True))


def _metric_values(raw: dict) -> dict[str, float]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, ...}`` -> the metric values only, stderrs left out."""
    return {k.removesuffix(",none"): float(v) for k, v in raw.items()
            if "," in k and "_stderr" not in k and isinstance(v, int | float)}  # fmt: skip


@pytest.mark.timeout(900)
def test_validate_equals_lm_eval_hf_on_the_export(eval_ckpt, prepared, tmp_path, capsys):  # noqa: F811
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from pd_lightning.cli import main
    from tests.test_train import tiny_fit_args

    # Ours: `validate` as the README says, no length / limit / shots flag.
    out = tmp_path / "validate.json"
    args = tiny_fit_args(prepared["tokens"], tmp_path / "v", 2, "--trainer.limit_val_batches", "1")
    args[0] = "validate"
    main([*args, "--ckpt_path", str(eval_ckpt), "--eval.tasks", json.dumps(list(ALL_TASKS)),
          "--eval.data_dir", str(REAL), "--eval.output", str(out)])  # fmt: skip
    printed, err = capsys.readouterr()
    ours = json.loads(out.read_text())

    # The field's: lm-eval's hf model on the export, its default length (the export's max_position_embeddings).
    folder = tmp_path / "hf"
    main(["export-hf", "--ckpt", str(eval_ckpt), "--output", str(folder)])
    assert json.loads((folder / "config.json").read_text())["max_position_embeddings"] == 4096
    ref_dir = tmp_path / "ref_tasks"
    ref_dir.mkdir()
    _reference_tasks(ref_dir)
    hf = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=8)
    assert hf.max_length == 4096
    from pd_lightning.eval.lm import StudentLM

    exported = StudentLM.from_hf(folder, progress=False)  # the adapter on the export: the same length, as recorded
    assert exported.max_length == 4096 and exported.trained_length == 64
    theirs = simple_evaluate(model=hf, tasks=list(ALL_TASKS), task_manager=TaskManager(include_path=str(ref_dir),
                             include_defaults=False), random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234,
                             fewshot_random_seed=1234, bootstrap_iters=0)  # fmt: skip
    for task in ALL_TASKS:
        want = _metric_values(theirs["results"][task])
        got = {k: v for k, v in ours["results"][task].items() if "_stderr" not in k}
        assert got == want, task
        assert math.isclose(ours["scores"][task], 100 * want[ours["config"]["primary_metric"][task]]), task
    # Every subject that has test/val rows, and only those: 3 MMLU subjects (dev has 57), 3 C-Eval folders.
    n = theirs["n-samples"]
    assert ours["config"]["n_samples"]["mmlu"] == {"original": 6, "effective": 6, "subjects": 3}
    assert (
        ours["config"]["n_samples"]["ceval"]["original"]
        == sum(n[t]["original"] for t in n if t.startswith("ceval-valid_"))
        == 7
    )
    assert "both" in err and "ceval" in err and "ignoring" in err  # the flat C-Eval file is named as ignored
    assert "fatal: not a git repository" not in err  # lm-eval's git lookup is kept quiet
    # The length used and the extrapolation are said once, with the counts.
    lengths = ours["lengths"]
    assert lengths["max_length"] == 4096 and lengths["trained_length"] == 64
    assert lengths["longest"] > 4096 and lengths["cut"] >= 1  # the long C3 document, cut from the left
    assert 0 < lengths["beyond_trained"] <= lengths["requests"]
    note = next(line for line in printed.splitlines() if line.startswith("scored at max length 4,096"))
    assert f"extrapolates on {lengths['beyond_trained']:,} of {lengths['requests']:,} requests" in note
