"""What `pd-lightning fit` prints on stderr (a subprocess, as a user sees it).

Issue 17: bad input found once the Trainer exists (while the data module or the model is set up, or the checkpoint
restored) came after Lightning's "Seed set to" / "GPU available" / "TPU available" lines, so stderr was not one line.
Lightning's info lines are now held until the run starts (``on_fit_start``) and dropped when bad input stops it
first; a run that starts prints them as before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pd_lightning.cli import main
from tests.test_train import small_token_file, tiny_fit_args

ROOT = Path(__file__).resolve().parents[1]


def fit(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pd_lightning.cli", *args], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def data(prepared, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fit_output")
    tokens = small_token_file(prepared, root / "tokens.h5", n_train=48, n_val=8)
    noval = small_token_file(prepared, root / "noval.h5", n_train=48, n_val=0)
    main(tiny_fit_args(tokens, root / "ckpt-run", 2, "--trainer.limit_val_batches=0"))
    return {"root": root, "tokens": tokens, "noval": noval, "ckpt": next((root / "ckpt-run").rglob("*.ckpt"))}


CASES = {
    # data module set-up, inside trainer.fit
    "no-validation-data": (lambda d, o: tiny_fit_args(d["noval"], o, 2), ("noval.h5", "validation")),
    # the model's set-up: alpha > 0 without teacher targets
    "alpha-without-teacher": (
        lambda d, o: tiny_fit_args(d["tokens"], o, 2, "--model.alpha=Constant", "--model.alpha.alpha=0.5"),
        ("--model.alpha", "teacher targets"),
    ),
    # the checkpoint restore: a student of another shape
    "resume-other-shape": (
        lambda d, o: tiny_fit_args(d["tokens"], o, 4, "--model.student.n_layer=3", "--ckpt_path", str(d["ckpt"])),
        ("--ckpt_path", "n_layer"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_found_after_the_trainer_starts_is_one_line(data, tmp_path, case):
    build, names = CASES[case]
    run = fit(build(data, tmp_path / "out"))
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pd-lightning: error: "), run.stderr[-3000:]
    assert all(name in lines[0] for name in names), lines[0]


def test_a_run_that_starts_still_prints_lightnings_lines(data, tmp_path):
    run = fit(tiny_fit_args(data["tokens"], tmp_path, 2, "--trainer.limit_val_batches=0"))
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    for start in ("Seed set to 7", "GPU available: False", "TPU available: False", "`Trainer.fit` stopped"):
        assert any(line.startswith(start) for line in lines), (start, lines)
    order = [next(i for i, line in enumerate(lines) if line.startswith(s)) for s in ("Seed", "GPU", "`Trainer")]
    assert order == sorted(order), lines
