"""`make demo` on another corpus: every path of the pipeline comes from the Makefile's CORPUS / DATA / RUNS.

Issue 7 item 12: running the demo on one's own corpus used to mean overriding paths in five places (one inside a
``callbacks+`` list). Here the commands `make -n demo` prints for other variables are resolved with
``--print_config`` (the config each command would run with) and no path of the demo's defaults may remain.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pd_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]


def demo_commands(**variables: str) -> list[list[str]]:
    """The pd-lightning commands (argv after the program name) `make demo` would run with these variables."""
    args = ["make", "-n", "-B", "demo", *(f"{k}={v}" for k, v in variables.items())]
    text = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    text = text.replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in text.splitlines() if line.split(" ", 1)[0].endswith("/pd-lightning")]


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_takes_every_path_from_its_variables(tmp_path, capsys):
    data, runs = tmp_path / "mine", tmp_path / "runs" / "mine"
    commands = demo_commands(CORPUS="corpus/*.jsonl", DATA=str(data), RUNS=str(runs))
    names = [c[0] for c in commands]
    assert names[:4] == ["prepare", "fit", "predict", "cache-info"] and names.count("fit") >= 3, commands
    prepare = commands[0]
    assert prepare[prepare.index("--input") + 1] == "corpus/*.jsonl"  # the shell expands the glob
    assert prepare[prepare.index("--output") + 1] == f"{data}/tokens.h5"
    for argv in commands:
        assert not any("data/demo" in a or "runs/demo" in a for a in argv), argv
        if argv[0] not in ("fit", "predict"):
            continue
        with pytest.raises(SystemExit) as e:
            main([*argv, "--print_config"])
        assert e.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        paths = [s for s in strings(config) if "/" in s and not s.startswith(("pd_lightning.", "lightning."))]
        paths = [p for p in paths if "." not in p.split("/")[0] or p.startswith(str(tmp_path))]
        assert paths, config
        for p in paths:  # inside the folders DATA and RUNS, not beside them (RUNS is no name prefix: item 21)
            assert p.startswith((f"{data}/", f"{runs}/")), f"{argv[0]}: {p!r} is not under DATA or RUNS"
    validates = [c for c in commands if c[0] == "validate"]  # each student's lm-eval scores, written in its run
    assert len(validates) == 3
    for v in validates:
        run = v[v.index("--trainer.default_root_dir") + 1]
        assert run.startswith(f"{runs}/") and v[v.index("--eval.output") + 1] == f"{run}/bench.json"
        assert v[v.index("--ckpt_path") + 1].startswith(f"$(ls -t {run}/lightning_logs/")
    teacher_fit = commands[1]
    assert teacher_fit[teacher_fit.index("--trainer.callbacks.init_args.dirpath") + 1] == f"{runs}/teacher"
    for predict in (c for c in commands if c[0] == "predict"):  # the teacher fit's ModelCheckpoint writes this file
        assert predict[predict.index("--model.teacher") + 1] == f"{runs}/teacher/teacher.ckpt"
    report = next(c for c in commands if c[0] == "report")
    assert report[report.index("--output") + 1] == f"{runs}/report"
    assert report[2:5] == [f"lm-only={runs}/student-lm", f"vanilla-pd={runs}/vanilla-pd", f"pd-star={runs}/pdstar"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_runs_is_a_folder_and_a_trailing_slash_changes_nothing(tmp_path):
    """Item 21: RUNS (and DATA) name folders; `RUNS=out/runs/` used to give `out/runs/-teacher`."""
    data, runs = tmp_path / "data", tmp_path / "out" / "runs"
    plain = demo_commands(DATA=str(data), RUNS=str(runs))
    assert demo_commands(DATA=f"{data}/", RUNS=f"{runs}/") == plain
    for argv in plain:
        assert not any("//" in a or "/-" in a for a in argv), argv
        assert not any(str(runs) in a and f"{runs}/" not in a for a in argv), argv  # nothing beside the folder
    seeds = subprocess.run(
        ["make", "-n", "-B", "demo-seeds", f"DATA={data}/", f"RUNS={runs}/"], cwd=ROOT, capture_output=True, text=True
    ).stdout.replace("\\\n", " ")
    sweep = next(shlex.split(x) for x in seeds.splitlines() if " sweep " in x)
    assert sweep[sweep.index("--output") + 1] == f"{runs}/seeds"
    assert sweep[sweep.index("--teacher") + 1] == f"{runs}/teacher/teacher.ckpt"
    assert sweep[sweep.index("--data_dir") + 1] == str(data)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_defaults_are_the_configs_own_folders():
    """`make demo` with no variables writes where each config would by itself: one folder per run in runs/demo/."""
    fits = [c for c in demo_commands() if c[0] == "fit"]
    assert len(fits) == 4
    for argv in fits:
        config_file = ROOT / argv[argv.index("--config") + 1]
        own = yaml.safe_load(config_file.read_text())["trainer"]["default_root_dir"]
        run = argv[argv.index("--trainer.default_root_dir") + 1]
        assert run == own and run.startswith("runs/demo/"), (config_file.name, run, own)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_the_teacher_is_validated_on_the_students_sequences(capsys):
    """Item 22: the teacher's validation loss is over the same sequences as the students' held-out loss (all of the
    held-out split), so the losses `make demo` prints can be compared."""
    fits = [c for c in demo_commands() if c[0] == "fit"]
    val = []
    for argv in fits:
        with pytest.raises(SystemExit):
            main([*argv, "--print_config"])
        data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
        val.append((data.get("val_tokens") or data["path"], data["val_sequences"]))
    assert val == [("data/demo/tokens.h5", None)] * 4, val


def test_prepare_defaults_are_the_demo_settings():
    """`pd-lightning prepare` with no flags writes what `make demo` writes (README: the demo's defaults)."""
    import inspect

    from pd_lightning.corpus.prepare import prepare

    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items()}
    argv = demo_commands()[0]
    given = dict(zip(argv[1::2], argv[2::2]))
    assert given["--input"] == defaults["input"] == "builtin"
    assert given["--output"] == defaults["output"] == "data/demo/tokens.h5"
    assert int(given["--seq_len"]) == defaults["seq_len"]
    assert int(given["--vocab_size"]) == defaults["vocab_size"]
