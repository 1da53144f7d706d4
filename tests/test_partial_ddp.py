"""``--data.allow_partial`` with 2 DDP reader ranks (gloo, CPU) on a cache that grows while they start (issue item
5): all ranks read rank 0's snapshot, so every sequence is read exactly once per epoch, and a resume onto a cache
that has grown since reads the snapshot its checkpoint was trained on.

The cache grows between the ranks' looks: Lightning starts the rank-1 process after rank 0 built its data module,
and ``GrowingCacheDataModule`` finishes one more shard in rank 1 before it opens the cache (as a running
``pd-lightning predict`` would). Every multi-process run is a ``pd-lightning fit`` subprocess, ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from pd_lightning.distill.processors import TopPK
from tests.test_cache import write_cache
from tests.test_train import quiet_trainer_args
from tests.workers.growing_cache import finish_next_shard

ROOT = Path(__file__).resolve().parents[1]
SEQ, PER_SHARD, SHARDS = 16, 4, 4  # 4 shards of 4 sequences of 16 positions
TIMEOUT = 300  # a collective one rank never joins fails the test instead of hanging it


def fit(path: Path, source: Path, root: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    args = [
        "fit", "--seed_everything", "3", "--model.student.preset", "tiny",
        "--data.class_path", "tests.workers.growing_cache.GrowingCacheDataModule",
        "--data.init_args.path", str(path), "--data.init_args.source", str(source),
        "--data.init_args.batch_size", "2",
        *quiet_trainer_args(root, steps),
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.limit_val_batches", "0",
        "--trainer.callbacks+=tests.workers.growing_cache.LogReads", f"--trainer.callbacks.log_dir={root / 'reads'}",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}", f"--trainer.callbacks.dirpath={root}",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def reads(root: Path, sequence_of: dict[tuple[int, ...], int]) -> dict[int, list[int]]:
    """epoch -> the global sequences trained in it, over both ranks."""
    out = defaultdict(list)
    for rank in (0, 1):
        for line in (root / "reads" / f"reads-{rank}.txt").read_text().splitlines():
            epoch, _, *tokens = map(int, line.split())
            out[epoch].append(sequence_of[tuple(tokens)])
    return dict(out)


def test_two_ranks_read_one_snapshot_of_a_growing_cache_and_a_resume_reads_its_own(tmp_path):
    source, path = tmp_path / "source", tmp_path / "partial"
    refs = write_cache(source, TopPK(0.9, 8), num=SHARDS * PER_SHARD, seq_len=SEQ, shard_tokens=PER_SHARD * SEQ)
    sequence_of = {tuple(refs[i][0][:-1].tolist()): i for i in refs}
    assert len(sequence_of) == len(refs)
    assert finish_next_shard(path, source) == 0 and finish_next_shard(path, source) == 1  # 8 of 16 sequences
    snapshot = list(range(2 * PER_SHARD))
    # 2 ranks x batch 2 over rank 0's 8 sequences: 2 steps per epoch; rank 1 saw shard 2 finished too.
    first = tmp_path / "first"
    proc = fit(path, source, first, 3)
    assert "training on 8 of 16 sequences" in proc.stderr
    assert (path / "shard-000002.h5").exists()  # rank 1 did look at a larger cache
    got = reads(first, sequence_of)
    assert sorted(got[0]) == snapshot, got  # epoch 0: every sequence of the snapshot exactly once
    # The cache grows again (complete now); a resume from step 3 (mid epoch 1) reads the checkpoint's snapshot.
    assert finish_next_shard(path, source) == 3
    resumed = tmp_path / "resumed"
    fit(path, source, resumed, 4, "--ckpt_path", str(first / "step=3.ckpt"))
    after = reads(resumed, sequence_of)
    assert set(after) == {1}
    assert sorted(got[1] + after[1]) == snapshot, (got[1], after[1])  # epoch 1 over the two runs: each once
    assert not np.isin(after[1], got[1]).any()
