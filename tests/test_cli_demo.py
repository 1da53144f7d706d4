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
        for p in paths:
            assert p.startswith((str(data), str(runs))), f"{argv[0]}: {p!r} is not under DATA or RUNS"
    validates = [c for c in commands if c[0] == "validate"]  # each student's lm-eval scores, written in its run
    assert len(validates) == 3
    for v in validates:
        assert v[v.index("--eval.output") + 1].startswith(f"{runs}-") and f"{runs}-" in v[v.index("--ckpt_path") + 1]
    teacher_fit = commands[1]
    assert teacher_fit[teacher_fit.index("--trainer.callbacks.init_args.dirpath") + 1] == f"{runs}-teacher"
    for predict in (c for c in commands if c[0] == "predict"):  # the teacher fit's ModelCheckpoint writes this file
        assert predict[predict.index("--model.teacher") + 1] == f"{runs}-teacher/teacher.ckpt"


def test_prepare_defaults_are_the_demo_settings():
    """`pd-lightning prepare` with no flags writes what `make demo` writes (README: the demo's defaults)."""
    import inspect

    from pd_lightning.data.corpus import prepare

    defaults = {k: p.default for k, p in inspect.signature(prepare).parameters.items()}
    argv = demo_commands()[0]
    given = dict(zip(argv[1::2], argv[2::2]))
    assert given["--input"] == defaults["input"] == "builtin"
    assert given["--output"] == defaults["output"] == "data/demo/tokens.h5"
    assert int(given["--seq_len"]) == defaults["seq_len"]
    assert int(given["--vocab_size"]) == defaults["vocab_size"]
