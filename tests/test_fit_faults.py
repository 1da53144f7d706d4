"""`pd-lightning fit` killed for real (SIGKILL, SIGTERM) anywhere, then resumed: the same run as an uninterrupted one.

Each faulty run is a subprocess with ``tests.faults.Fault`` (a real signal at an exact point); its resume runs
through the CLI as a user would (``--ckpt_path last``). No ``limit_train_batches``: 48 sequences, batch 4, so an
epoch is 12 steps and the 20-step runs cross into epoch 1; validation every 10 steps, checkpoints every 5 steps
plus ``last.ckpt``.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from pd_lightning.cli import main
from tests.test_train import small_token_file, tiny_fit_args

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 20


def fit_args(tokens: Path, root: Path, version: int = 0, *extra: str) -> list[str]:
    args = tiny_fit_args(
        tokens,
        root,
        MAX_STEPS,
        "--trainer.val_check_interval=10",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={root / 'ckpt'}",
        "--trainer.callbacks.every_n_train_steps=5",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
        *extra,
    )
    i = args.index("--trainer.logger.version")
    args[i + 1] = str(version)
    return args


def logged(root: Path, version: int) -> tuple[dict[int, float], dict[int, int], dict[int, float]]:
    """(step -> train loss, step -> epoch, step -> val loss) from the CSV log; steps are 1-based."""
    with open(root / "log" / f"version_{version}" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = {int(r["step"]) + 1: float(r["train/loss"]) for r in rows if r.get("train/loss")}
    epochs = {int(r["step"]) + 1: int(r["epoch"]) for r in rows if r.get("train/loss")}
    val = {int(r["step"]) + 1: float(r["val/loss"]) for r in rows if r.get("val/loss")}
    return train, epochs, val


def weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    assert ckpt["global_step"] == MAX_STEPS
    return ckpt["state_dict"]


@pytest.fixture(scope="module")
def tokens(prepared, tmp_path_factory) -> Path:
    return small_token_file(prepared, tmp_path_factory.mktemp("faults") / "tokens.h5", n_train=48, n_val=8)


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("reference")
    main(fit_args(tokens, root))
    train, epochs, val = logged(root, 0)
    assert sorted(train) == list(range(1, MAX_STEPS + 1))
    assert epochs[12] == 0 and epochs[13] == 1  # the run crosses an epoch boundary
    assert sorted(val) == [10, 20]
    return {"train": train, "epochs": epochs, "val": val, "weights": weights(root / "ckpt" / "last.ckpt")}


def run_with_fault(tokens: Path, root: Path, at: str, step: int, env: dict | None = None, preexec_fn=None):
    """``pd-lightning fit`` in a subprocess with ``tests.faults.Fault(at, step)``; the CompletedProcess."""
    args = [*fit_args(tokens, root), "--trainer.callbacks+=tests.faults.Fault", f"--trainer.callbacks.at={at}"]
    args.append(f"--trainer.callbacks.step={step}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    if preexec_fn is None:  # SIGINT at its default, whatever this process inherited (a background CI job ignores it)
        import signal

        preexec_fn = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    return subprocess.run(
        [sys.executable, "-m", "pd_lightning.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=preexec_fn,
    )


def resume_and_compare(tokens: Path, root: Path, reference: dict, resumed_from: int) -> None:
    main([*fit_args(tokens, root, 1), "--ckpt_path", "last"])
    train, epochs, val = logged(root, 1)
    assert sorted(train) == list(range(resumed_from + 1, MAX_STEPS + 1))  # no step lost or repeated
    for step, loss in train.items():
        assert loss == reference["train"][step], (step, loss, reference["train"][step])
    assert epochs == {s: e for s, e in reference["epochs"].items() if s > resumed_from}
    assert val and all(v == reference["val"][s] for s, v in val.items())
    final = weights(root / "ckpt" / "last.ckpt")
    assert all(torch.equal(final[k], reference["weights"][k]) for k in reference["weights"])
    assert not list((root / "ckpt").glob(".*tmp*"))  # the next save cleared what a kill left behind


@pytest.mark.parametrize(
    "at,step,resumed_from",
    [
        ("train", 8, 5),  # first epoch
        ("train", 17, 15),  # a later epoch
        ("validation", 10, 10),  # the checkpoint of step 10 is written before its validation runs
        ("save", 15, 10),  # during the write of last.ckpt at step 15: last.ckpt must still be step 10's
    ],
)
def test_sigkill_then_resume_equals_uninterrupted(tokens, reference, tmp_path, at, step, resumed_from):
    env = {}
    shm = Path("/dev/shm")
    if at == "save" and shm.is_dir() and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        # The temporary directory on another filesystem (tmpfs /tmp is common): a writer that stages the file there
        # (Lightning's own, via fsspec) must copy it into place, and a kill during that copy truncates last.ckpt.
        env["TMPDIR"] = str(Path(tempfile.mkdtemp(dir=shm)))
    try:
        run = run_with_fault(tokens, tmp_path, at, step, env)
    finally:
        if "TMPDIR" in env:
            shutil.rmtree(env["TMPDIR"], ignore_errors=True)
    assert run.returncode == -9, run.stderr[-3000:]
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # never a half-written file
    assert last["global_step"] == resumed_from
    if at == "save":
        assert list((tmp_path / "ckpt").glob(".last.ckpt.tmp-*"))  # the half-written file is the temporary one
    resume_and_compare(tokens, tmp_path, reference, resumed_from)


@pytest.mark.parametrize(
    "fault,code,stopped",
    [("sigterm", 143, "stopped by SIGTERM"), ("sigint", 130, "interrupted by SIGINT (Ctrl-C)")],
)
def test_stop_signal_saves_and_exits_nonzero_then_resumes(tokens, reference, tmp_path, fault, code, stopped):
    """SIGTERM (a scheduler's stop) exits 143, SIGINT (Ctrl-C) 130 (was: Lightning's "graceful shutdown", exit 1 and
    no last.ckpt); both finish the current step, save last.ckpt and say so in one line; the resume is exact."""
    run = run_with_fault(tokens, tmp_path, fault, 8)
    assert run.returncode == code, (run.returncode, run.stderr[-3000:])
    lines = [line for line in run.stderr.splitlines() if line.startswith("pd-lightning:")]
    assert len(lines) == 1 and lines[0].startswith(f"pd-lightning: {stopped} at step 8 of 20"), run.stderr[-2000:]
    assert "--ckpt_path" in lines[0] and f"exit code {code}" in lines[0], lines
    assert "graceful shutdown" not in run.stderr + run.stdout and "Traceback" not in run.stderr
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 8
    resume_and_compare(tokens, tmp_path, reference, 8)


def test_sigint_ignored_by_the_parent_stays_ignored(tokens, reference, tmp_path):
    """A background job of a shell without job control starts with SIGINT ignored (so that a Ctrl-C for the
    foreground command leaves it running): `fit` keeps ignoring it and runs to its end."""
    import signal

    run = run_with_fault(tokens, tmp_path, "sigint", 8, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    assert not [line for line in run.stderr.splitlines() if line.startswith("pd-lightning:")], run.stderr[-2000:]
    assert logged(tmp_path, 0)[0] == reference["train"]


@pytest.mark.parametrize("fault", ["sigterm", "sigterm_save", "sigterm_teardown"])
def test_sigterm_after_the_last_step_is_a_complete_run(tokens, reference, tmp_path, fault):
    """SIGTERM once every optimizer step is done -- after the last batch, during its checkpoint, during the teardown --
    stops nothing: the final validation and checkpoints happen, the run says it is complete and exits 0 (was: "step
    20 of 20, before the end" and exit 143, or killed by the signal; `pd-lightning sweep` then redid the run)."""
    run = run_with_fault(tokens, tmp_path, fault, MAX_STEPS)
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    lines = [line for line in run.stderr.splitlines() if line.startswith("pd-lightning:")]
    assert len(lines) == 1, run.stderr[-2000:]
    assert "SIGTERM" in lines[0] and "complete" in lines[0] and "before the end" not in lines[0], lines
    train, epochs, val = logged(tmp_path, 0)
    assert train == reference["train"] and val == reference["val"]  # the final validation ran in full
    final = weights(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(final[k], reference["weights"][k]) for k in reference["weights"])
    assert torch.load(tmp_path / "ckpt" / "step=20.ckpt", weights_only=True)["global_step"] == MAX_STEPS


def test_slurm_requeue_still_works(tokens, reference, tmp_path):
    """Under SLURM (its environment variables; a stand-in ``scontrol`` that records its arguments), SIGUSR1 still
    makes Lightning save ``hpc_ckpt_1.ckpt`` and requeue the job, and the run goes on to its end (exit 0)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost"}
    slurm |= {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    slurm["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    run = run_with_fault(tokens, tmp_path, "sigusr1", 7, env=slurm)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert hpc["global_step"] == 7
    final = weights(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(final[k], reference["weights"][k]) for k in reference["weights"])


@pytest.mark.parametrize(
    "fault,message",
    [
        (["--model.lr=1e30"], "optimizer step 2 made the weights non-finite"),  # the loss stays finite
        (
            ["--trainer.callbacks+=tests.faults.Fault", "--trainer.callbacks.at=nan", "--trainer.callbacks.step=3"],
            "the training loss is not finite after 3 optimizer steps",
        ),
    ],
    ids=["weights-overflow", "nan-loss"],
)
def test_non_finite_run_stops_before_saving_bad_weights(tokens, tmp_path, capsys, fault, message):
    """A run whose loss or weights turn non-finite stops there with one line and exit code 2, and every checkpoint
    it wrote holds finite weights (before: it went on and saved NaN over the good ones, exit 0)."""
    args = fit_args(tokens, tmp_path, 0, "--trainer.callbacks.every_n_train_steps=1", *fault)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"pd-lightning: error: {message}"), err[-3:]
    ckpts = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert ckpts
    for path in ckpts:
        state = torch.load(path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), path
