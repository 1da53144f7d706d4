"""``benchmarks/gpu_check.sh`` (issue 11): shell syntax, and its CPU dry run (tiny shapes) end to end."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_syntax():
    run = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_gpu_check_dry_run_prints_the_result_line():
    """The dry run selects the GPU-marked tests (not an empty selection), runs the student and teacher benchmarks at
    tiny shapes on CPU and ends with the RESULT line: on CPU there is no peak FLOPs figure, so MFU is ``na``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    lines = run.stdout.strip().splitlines()
    assert re.search(r"\b1 (test|/\d+ tests) collected|1/\d+ tests collected", run.stdout), run.stdout[-2000:]
    result = dict(kv.split("=", 1) for kv in lines[-1].split()[1:])
    assert lines[-1].startswith("RESULT ") and result["tests"] == "dry" and result["device"] == "cpu"
    assert result["mfu_lm"] == result["mfu_kd"] == "na"
    for key in ("kd_over_lm", "write_ratio", "tok_s_lm", "tok_s_kd", "teacher_tok_s"):
        assert float(result[key]) > 0, (key, result[key])
    # the benchmark states its thread count and prints the spread of the paired ratios
    assert "torch threads 1" in run.stdout and "paired: median" in run.stdout
