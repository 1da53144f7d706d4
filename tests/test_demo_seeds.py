"""``benchmarks/demo_seeds.py`` (item 23): per-seed results in the order the seeds were given and run."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("demo_seeds", ROOT / "benchmarks" / "demo_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_seeds_prints_seeds_in_the_order_given(tmp_path, monkeypatch, capsys):
    demo_seeds = load_script()
    seeds = [1234, 1, 2]  # `make demo-seeds`: --seeds 1234 1 2; the sweep's results.jsonl keeps that order
    gains = {1234: 5.0, 1: 1.0, 2: 3.0}  # PD*'s Δ% per seed, distinct so the printed order shows
    rows = [
        {"name": name, "seed": s, "baseline": name == "student_lm"} for s in seeds for name in ("student_lm", "pdstar")
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    wiggle = torch.tensor([0.01, -0.01] * 20, dtype=torch.float64)  # 40 sequences, mean 0: a nonzero std

    def losses(ckpt, tokens, batch=16):
        name, seed = ckpt.name.rsplit("-s", 1)
        seed = int(seed)
        lm = torch.full((40,), 5.0 + seed / 1e4, dtype=torch.float64)
        return lm if name == "student_lm" else lm * (1 - gains[seed] / 100) + wiggle

    monkeypatch.setattr(demo_seeds, "TokenFile", lambda path: None)
    monkeypatch.setattr(demo_seeds, "last_checkpoint", lambda run_dir: run_dir)
    monkeypatch.setattr(demo_seeds, "per_sequence_losses", losses)
    monkeypatch.setattr(sys, "argv", ["demo_seeds.py", str(tmp_path)])
    demo_seeds.main()
    out = capsys.readouterr().out
    per_seed = re.search(r"pdstar: Δ% per seed (.*?) \(all 40 seqs\)", out)
    assert per_seed and per_seed.group(1) == "+5.00, +1.00, +3.00", out
    table = [int(line.split()[0]) for line in out.splitlines() if re.match(r"\s*\d+\s+\d+\.\d{4}\s", line)]
    assert table == seeds, out
