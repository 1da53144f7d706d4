"""Benchmark scoring of a live student under FSDP1 (Lightning's ``FSDPStrategy``, ``configs/trainer/fsdp.yaml``).

Lightning refuses ``FSDPStrategy`` without a GPU, so the worker (``tests/workers/fsdp1_eval.py``) wraps a
``DistillationModule`` on 2 gloo CPU ranks as the strategy does (one root ``FullyShardedDataParallel``,
``use_orig_params=True``; with and without one unit per ``Block``) and calls ``score_module`` as the callback and
``validate`` do. Before the fix the student was called with its parameters still flat shards outside the root's
forward: ``RuntimeError: 'weight' must be 2-D``. Now ``score_module`` gathers them whole for the duration
(``pd_lightning.eval.distributed.full_fsdp1_parameters``) and each rank scores its share on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "eval"


def test_fsdp1_scores_equal_one_process(tmp_path, prepared, monkeypatch):
    """Both ranks get the scores and every per-request answer of an unwrapped one-process run (log-likelihoods within
    1e-5: other batch compositions; greedy flags and generated text equal); afterwards the parameters are sharded
    again, the module is back in training mode and the root still runs a training forward/backward."""
    from tests.workers.fsdp1_eval import build_module, score

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    out = tmp_path / "res"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    worker = ROOT / "tests" / "workers" / "fsdp1_eval.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(out), str(prepared["tokenizer"]), str(FIXTURES)]  # fmt: skip
    # A collective one rank never joins would hang: the timeout fails the test instead.
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]

    module = build_module()
    reference = score(None, module, str(prepared["tokenizer"]), str(FIXTURES))
    assert reference["loglikelihood"] and reference["generate_until"]
    for wrap in ("root", "blocks"):
        for rank in range(2):
            got = json.loads((tmp_path / f"res.{wrap}.{rank}.json").read_text())
            assert got["scores"] == pytest.approx(reference["scores"], abs=1e-6), (wrap, rank)
            assert got["average"] == pytest.approx(reference["average"], abs=1e-6)
            assert [g for _, g in got["loglikelihood"]] == [g for _, g in reference["loglikelihood"]]
            assert [v for v, _ in got["loglikelihood"]] == pytest.approx(
                [v for v, _ in reference["loglikelihood"]], abs=1e-5
            )
            assert got["generate_until"] == reference["generate_until"]
            assert got["sharded_after"] and got["training_after"], (wrap, rank)
        # The ranks ran different numbers of forwards (6 vs 5 for the 11 log-likelihood requests): scoring on the
        # gathered parameters takes no collective per forward (with per-Block units it did before their forward
        # was bypassed: gloo "Connection reset by peer").
        counts = [json.loads((tmp_path / f"res.{wrap}.{rank}.json").read_text())["forwards"] for rank in range(2)]
        assert counts[0] != counts[1], counts
