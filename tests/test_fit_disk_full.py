"""`pd-lightning fit` on a real full disk: a small tmpfs mounted as the checkpoint folder fills up mid-run.

The run must end with one line ``pd-lightning: error: …`` naming the file it could not write (exit code 2, no
traceback: it used to print two, torch's ``OSError`` and the ``RuntimeError`` its zip writer raised on top), leave
the checkpoints written before intact (``last.ckpt`` still loads) and no partial file, and a rerun with
``--ckpt_path last`` once there is space resumes exactly where that checkpoint was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pd_lightning.checkpoint_io import load_checkpoint
from pd_lightning.cli import main
from tests.test_train import small_token_file, tiny_fit_args, train_losses

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# The tiny student's checkpoint (vocab 512) is ~1.9 MB: step 3's two files fit in 5 MB, step 6's first does not.
SIZE = "5m"


def _mount(folder: Path, size: str) -> None:
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {run.stderr.decode().strip()[:200]}")


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    _mount(folder, SIZE)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def args(tokens: Path, root: Path, ckpt: Path, *extra: str) -> list[str]:
    return tiny_fit_args(
        tokens,
        root,
        STEPS,
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        f"--trainer.callbacks.dirpath={ckpt}",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_last=true",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
        *extra,
    )


def test_full_disk_is_one_line_and_the_rerun_resumes(prepared, tmp_path, small_disk):
    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=48, n_val=8)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "pd_lightning.cli", *args(tokens, tmp_path / "run", small_disk)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert lines[-1].startswith("pd-lightning: error: "), lines[-3:]
    assert [line for line in lines if "error" in line.lower()] == lines[-1:], lines
    assert str(small_disk / "step=6.ckpt") in lines[-1] and "no space left" in lines[-1], lines[-1]
    assert "--ckpt_path" in lines[-1], lines[-1]  # says how to go on
    # What was finished is usable: step 3's checkpoints load, nothing partial is left.
    assert sorted(p.name for p in small_disk.iterdir()) == ["last.ckpt", "step=3.ckpt"]
    assert load_checkpoint(small_disk / "last.ckpt", "--ckpt_path", kind="resume")["global_step"] == 3
    # Free space (a bigger disk), rerun with --ckpt_path last: steps 4-6 as an uninterrupted run has them.
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    main(args(tokens, tmp_path / "resumed", small_disk, "--ckpt_path", "last"))
    main(args(tokens, tmp_path / "full", tmp_path / "full-ckpt"))
    resumed, full = train_losses(tmp_path / "resumed"), train_losses(tmp_path / "full")
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == full[s] for s in resumed), (resumed, full)
    final = torch.load(small_disk / "last.ckpt", weights_only=True)
    reference = torch.load(tmp_path / "full-ckpt" / "last.ckpt", weights_only=True)
    assert final["global_step"] == STEPS
    assert all(torch.equal(final["state_dict"][k], v) for k, v in reference["state_dict"].items())
