"""The seven task definitions over local files: data checks and the prompts lm-eval builds from them."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.eval_fixtures import FIXTURES  # sets the offline HF environment first

# isort: split
from pd_lightning.eval.tasks import DEFAULT_FEWSHOT, KNOWN_TASKS, PRIMARY_METRIC, check_data, write_task_dir


def test_known_tasks_and_paper_defaults():
    assert KNOWN_TASKS == ("hellaswag", "winogrande", "piqa", "mmlu", "c3", "ceval", "gsm8k")
    assert DEFAULT_FEWSHOT == dict(hellaswag=0, winogrande=0, piqa=0, mmlu=5, c3=5, ceval=5, gsm8k=8)
    assert PRIMARY_METRIC["gsm8k"] == "exact_match,strict-match" and PRIMARY_METRIC["mmlu"] == "acc"


def test_fixtures_pass_the_checks():
    found = check_data(FIXTURES, KNOWN_TASKS)
    assert found["mmlu"].flat_subjects and set(found["ceval"].files) == {"high_school_physics", "pd_custom_subject"}


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task\(s\) arc.*known tasks: hellaswag, winogrande, piqa"):
        check_data(FIXTURES, ["piqa", "arc"])


def test_missing_folder_and_file_name_task_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval data folder .*nope.* does not exist"):
        check_data(tmp_path / "nope", ["piqa"])
    shutil.copytree(FIXTURES / "gsm8k", tmp_path / "gsm8k")
    (tmp_path / "gsm8k" / "train.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"gsm8k: expected .*gsm8k/train.jsonl"):
        check_data(tmp_path, ["gsm8k"])  # 8-shot needs the train split
    check_data(tmp_path, ["gsm8k"], num_fewshot={"gsm8k": 0})  # 0-shot does not
    with pytest.raises(FileNotFoundError, match=r"hellaswag: expected .*hellaswag/validation.jsonl"):
        check_data(tmp_path, ["hellaswag"])
    with pytest.raises(FileNotFoundError, match=r"ceval: expected .*ceval/val.jsonl or one folder per subject"):
        check_data(tmp_path, ["ceval"])


def test_bad_rows_name_file_and_line(tmp_path):
    (tmp_path / "piqa").mkdir()
    rows = [json.loads(x) for x in (FIXTURES / "piqa" / "validation.jsonl").read_text().splitlines()]
    del rows[1]["sol2"]
    (tmp_path / "piqa" / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"piqa/validation.jsonl:2: piqa row lacks field\(s\) sol2"):
        check_data(tmp_path, ["piqa"])
    (tmp_path / "piqa" / "validation.jsonl").write_text('{"goal": "x", "sol1": "a", "sol2": "b", "label": 0}\n{oops\n')
    with pytest.raises(ValueError, match=r"validation.jsonl:2: not valid JSON"):
        check_data(tmp_path, ["piqa"])
    # A subject becomes a file and task name: no path separators.
    shutil.copytree(FIXTURES / "mmlu", tmp_path / "mmlu")
    rows = (tmp_path / "mmlu" / "dev.jsonl").read_text().replace('"astronomy"', '"../astronomy"', 1)
    (tmp_path / "mmlu" / "dev.jsonl").write_text(rows)
    with pytest.raises(ValueError, match=r"dev.jsonl: row 6: subject '../astronomy' must be a name"):
        check_data(tmp_path, ["mmlu"])


def _docs_and_prompts(tmp_path, task_names, shots=None):
    from lm_eval.tasks import TaskManager, get_task_dict

    write_task_dir(FIXTURES, tmp_path, task_names, shots)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    return manager, get_task_dict(list(task_names), manager)


def _leaf_tasks(task_dict) -> dict:
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(_leaf_tasks(value))
        else:
            out[getattr(key, "group_name", key) if not isinstance(key, str) else key] = value
    return out


def test_prompts_follow_lm_eval_builtin_tasks(tmp_path):
    """The prompts are lm-eval's own (included files), checked against hand-written expected strings."""
    _, tasks = _docs_and_prompts(tmp_path, ["hellaswag", "piqa", "winogrande", "mmlu", "ceval", "c3"])
    leaves = _leaf_tasks(tasks)
    assert set(leaves) >= {"hellaswag", "piqa", "winogrande", "mmlu_astronomy", "ceval_pd_custom_subject", "c3"}

    hs = leaves["hellaswag"]
    doc = next(iter(hs.validation_docs()))
    assert hs.doc_to_text(doc) == (
        "Making tea: A man fills a kettle with water and sets it on the stove. He"
    )  # activity label + ctx_a + capitalised ctx_b (lm-eval's process_docs)
    assert hs.doc_to_choice(doc)[1] == "throws the kettle into the garden. and sings."  # "[title]" cleaned

    piqa = leaves["piqa"]
    doc = next(iter(piqa.validation_docs()))
    assert piqa.doc_to_text(doc) == "Question: How do you keep bread fresh for longer?\nAnswer:"

    wg = leaves["winogrande"]
    doc = next(iter(wg.validation_docs()))
    assert wg.doc_to_choice(doc) == ["The glass fell on the rug but did not break because the glass",
                                     "The glass fell on the rug but did not break because the rug"]  # fmt: skip

    astro = leaves["mmlu_astronomy"]
    doc = next(iter(astro.test_docs()))
    ctx = astro.fewshot_context(doc, 5)
    assert ctx.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert ctx.count("\nAnswer:") == 6 and "What is the Moon?" in ctx and "What is 2 + 2?" not in ctx
    assert ctx.endswith("Which planet is closest to the Sun?\nA. Venus\nB. Earth\nC. Mars\nD. Mercury\nAnswer:")

    custom = leaves["ceval_pd_custom_subject"]
    doc = next(iter(custom.validation_docs()))
    ctx = custom.fewshot_context(doc, 5)
    assert ctx.startswith("以下是中国关于pd_custom_subject的单项选择题，请选出其中的正确答案。\n\n")
    assert ctx.endswith("一年有几个月？\nA. 十个\nB. 十一个\nC. 十二个\nD. 十三个\n答案：")
    physics = leaves["ceval_high_school_physics"]
    assert physics.fewshot_context(next(iter(physics.validation_docs())), 0).startswith("以下是中国关于高中物理的")

    c3 = leaves["c3"]
    doc = next(iter(c3.validation_docs()))
    assert (
        c3.doc_to_text(doc)
        == "文章：男：今天下午我们去图书馆吧。 女：好的，我三点以后有空。\n问题：他们打算去哪里？\n答案："
    )
    assert c3.doc_to_choice(doc) == ["图书馆", "电影院", "公园"] and c3.doc_to_target(doc) == 0
    assert c3.config.target_delimiter == "" and c3.config.num_fewshot == 5


def test_num_fewshot_override_and_gsm8k_generation_settings(tmp_path):
    _, tasks = _docs_and_prompts(tmp_path, ["gsm8k"], {"gsm8k": 2})
    gsm = _leaf_tasks(tasks)["gsm8k"]
    assert gsm.config.num_fewshot == 2 and gsm.config.fewshot_split == "train"
    assert (
        gsm.config.generation_kwargs["until"][0] == "Question:" and gsm.config.generation_kwargs["do_sample"] is False
    )


def test_task_folder_command(tmp_path, capsys):
    from pd_lightning.eval.tasks import main

    with pytest.raises(SystemExit) as e:
        main(["--data_dir", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])
    assert e.value.code == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"pd_lightning.eval.tasks: error: eval data folder {str(tmp_path / 'missing')!r} does not exist "
        "(write it with `pd-lightning eval-data`)"
    ]
    main(["--data_dir", str(FIXTURES), "--output", str(tmp_path / "out"), "--tasks", "piqa,ceval"])
    names = sorted(p.name for p in (tmp_path / "out").glob("*.yaml"))
    assert names == ["_ceval_group.yaml", "ceval_high_school_physics.yaml", "ceval_pd_custom_subject.yaml", "piqa.yaml"]
    assert "--include_path" in capsys.readouterr().out


def test_too_few_fewshot_rows_are_refused_before_lm_eval(tmp_path):
    """lm-eval itself fails late with "Sample larger than population" / an AssertionError; the check names the file,
    the shots and the rows it has."""
    for task in ("c3", "gsm8k", "mmlu", "ceval"):
        shutil.copytree(FIXTURES / task, tmp_path / task)
    c3 = tmp_path / "c3" / "validation.jsonl"
    c3.write_text("".join(c3.read_text().splitlines(keepends=True)[:3]))  # 3 rows: 5-shot needs 6 (the row is left out)
    with pytest.raises(
        ValueError, match=r"c3: 5-shot .* other rows of .*c3/validation.jsonl, which needs 6 rows.*has 3"
    ):
        check_data(tmp_path, ["c3"])
    check_data(tmp_path, ["c3"], num_fewshot={"c3": 2})  # 2 shots from the 2 other rows
    with pytest.raises(ValueError, match=r"c3: 3-shot"):
        check_data(tmp_path, ["c3"], num_fewshot={"c3": 3})
    train = tmp_path / "gsm8k" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(ValueError, match=r"gsm8k: 8-shot needs 8 rows in .*gsm8k/train.jsonl, it has 3"):
        check_data(tmp_path, ["gsm8k"])
    check_data(tmp_path, ["gsm8k"], num_fewshot={"gsm8k": 3})
    dev = tmp_path / "mmlu" / "dev.jsonl"  # flat file, rows carry their subject
    rows = [json.loads(x) for x in dev.read_text().splitlines()]
    subject = rows[0]["subject"]
    kept = [r for r in rows if r["subject"] != subject] + [r for r in rows if r["subject"] == subject][:2]
    dev.write_text("".join(json.dumps(r) + "\n" for r in kept))
    with pytest.raises(
        ValueError, match=rf"mmlu: 5-shot needs 5 dev rows per subject, .*dev.jsonl \(subject {subject}\) has 2"
    ):
        check_data(tmp_path, ["mmlu"])
    check_data(tmp_path, ["mmlu"], num_fewshot={"mmlu": 2})
    (subject_dev,) = sorted((tmp_path / "ceval").glob("*/dev.jsonl"))[:1]
    subject_dev.write_text(subject_dev.read_text().splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match=rf"ceval: 5-shot needs 5 dev rows per subject, {subject_dev} has 1"):
        check_data(tmp_path, ["ceval"])
    with pytest.raises(ValueError, match=r"num_fewshot for piqa must be >= 0, got -1"):
        check_data(FIXTURES, ["piqa"], num_fewshot={"piqa": -1})


def test_mmlu_dev_with_more_subjects_than_test_scores_the_test_subjects_only(tmp_path):
    """As released, MMLU's dev split holds every subject; a test split of fewer subjects (a subset, a limited copy)
    gave subtasks with no test split, and `validate` stopped with `error: test`."""
    real = FIXTURES.parent / "eval_real"
    written = write_task_dir(real, tmp_path / "tasks", ["mmlu"])
    assert written["mmlu"] == ["mmlu_astronomy", "mmlu_high_school_physics", "mmlu_machine_learning"]
    assert len({json.loads(line)["subject"] for line in (real / "mmlu/dev.jsonl").open()}) == 57


def test_ceval_with_both_layouts_scores_the_subject_folders_and_says_so(tmp_path, capsys):
    """Both the flat ceval/val.jsonl and per-subject folders present: the folders are scored (each subject with its
    own description and dev shots), and one warning line names the ignored flat file."""
    from pd_lightning.eval import tasks as tasks_module

    real = FIXTURES.parent / "eval_real"
    tasks_module._WARNED.clear()
    found = check_data(real, ["ceval"])
    assert set(found["ceval"].files) == {"college_physics", "computer_network", "high_school_mathematics"}
    written = write_task_dir(real, tmp_path / "tasks", ["ceval"])
    assert len(written["ceval"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pd-lightning: warning: ceval: both ")
    assert "ceval/val.jsonl" in err[0] and "ignoring" in err[0]
    cfg = (tmp_path / "tasks" / "ceval_computer_network.yaml").read_text(encoding="utf-8")
    assert "ceval/computer_network/val.jsonl" in cfg and "ceval-valid_computer_network.yaml" in cfg
