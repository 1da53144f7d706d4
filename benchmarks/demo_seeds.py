"""The demo's result over seeds, and where its variance comes from — `make demo-seeds` then

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/demo_seeds.py runs/demo/seeds [--data data/demo/tokens.h5]

Reads a `pd-lightning sweep` folder (the demo's three students x seeds, `make demo-seeds`), reloads each run's
final checkpoint and scores every validation sequence (LM loss, mean nats/token over its 255 predicted tokens) in
fp32. Prints, per seed (in the order the sweep was given them: 1234, 1, 2 for `make demo-seeds`), the held-out loss
of each student and the paired Δ% = 100·(L_lm − L)/L_lm; over seeds the mean Δ%, the sample std of the paired Δ% and
their ratio; and the two noise sources of one demo run:

- validation-set sampling: the standard error of a run's Δ% from the per-sequence paired differences (d_i =
  loss_lm,i − loss_pd,i; SE = 100·sd(d)/sqrt(n)/L_lm), with the first 32 sequences (the demo's old set) and with all;
- weights + data order (``--seed_everything``): the std over seeds of the LM-only loss alone against the std of the
  paired Δ% (the pairing removes what the students share, e.g. which sequences are easy).

Ends with ``RESULT key=value ...``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from pd_lightning.corpus.prepare import TokenFile
from pd_lightning.eval.lm import load_student_checkpoint


@torch.no_grad()
def per_sequence_losses(ckpt: Path, tokens: TokenFile, batch: int = 16) -> torch.Tensor:
    model, _ = load_student_checkpoint(ckpt)
    n = tokens.lengths["val"]
    out = []
    for start in range(0, n, batch):
        rows = torch.from_numpy(tokens.rows("val", slice(start, min(n, start + batch))).astype("int64"))
        logits = model(rows[:, :-1]).float()  # (B, L, V)
        nll = F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none")  # (B, L)
        out.append(nll.mean(1))
    return torch.cat(out).double()


def last_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no checkpoint")
    return ckpts[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="the folder of `make demo-seeds` (runs/demo/seeds)")
    p.add_argument("--data", default="data/demo/tokens.h5", help="the token file whose val split is scored")
    args = p.parse_args()
    rows = [json.loads(x) for x in (Path(args.sweep) / "results.jsonl").read_text().splitlines() if x.strip()]
    tokens = TokenFile(args.data)
    base_name = next(r["name"] for r in rows if r.get("baseline"))
    seeds = list(dict.fromkeys(r["seed"] for r in rows))  # the order they were given and run in (`--seeds 1234 1 2`)
    names = list(dict.fromkeys(r["name"] for r in rows))
    losses: dict[tuple[str, int], torch.Tensor] = {}
    for r in rows:
        run_dir = Path(args.sweep) / "runs" / f"{r['name']}-s{r['seed']}"
        losses[(r["name"], r["seed"])] = per_sequence_losses(last_checkpoint(run_dir), tokens)
    n_all = len(next(iter(losses.values())))
    print(f"torch threads {torch.get_num_threads()}; {len(seeds)} seeds; {n_all} validation sequences")
    result = {}
    for name in names:
        if name == base_name:
            continue
        deltas, deltas32, se_all, se_32 = [], [], [], []
        for s in seeds:
            lm, pd = losses[(base_name, s)], losses[(name, s)]
            d = lm - pd
            deltas.append(100 * d.mean().item() / lm.mean().item())
            deltas32.append(100 * d[:32].mean().item() / lm[:32].mean().item())
            se_all.append(100 * d.std().item() / math.sqrt(len(d)) / lm.mean().item())
            se_32.append(100 * d[:32].std().item() / math.sqrt(32) / lm[:32].mean().item())
        mean, sd = statistics.fmean(deltas), statistics.stdev(deltas)
        print(
            f"{name}: Δ% per seed {', '.join(f'{x:+.2f}' for x in deltas)} (all {n_all} seqs); "
            f"{', '.join(f'{x:+.2f}' for x in deltas32)} (first 32 seqs)"
        )
        print(
            f"{name}: mean Δ% {mean:+.2f}, std of paired Δ% {sd:.2f}, mean/std {abs(mean) / sd:.1f}; "
            f"val-sampling SE of one run's Δ%: {statistics.fmean(se_32):.2f} (32 seqs) vs "
            f"{statistics.fmean(se_all):.2f} ({n_all} seqs)"
        )
        key = name.replace("-", "_")
        result |= {f"{key}_delta_mean": f"{mean:.2f}", f"{key}_delta_std": f"{sd:.2f}"}
        result |= {f"{key}_se32": f"{statistics.fmean(se_32):.2f}", f"{key}_se_all": f"{statistics.fmean(se_all):.2f}"}
    print(f"{'seed':>6} " + " ".join(f"{n:>22}" for n in names))  # the held-out loss of each run
    for s in seeds:
        print(f"{s:>6} " + " ".join(f"{losses[(n, s)].mean().item():>22.4f}" for n in names))
    lm_means = [losses[(base_name, s)].mean().item() for s in seeds]
    lm_std_pct = 100 * statistics.stdev(lm_means) / statistics.fmean(lm_means)
    print(f"LM-only loss over seeds: std {statistics.stdev(lm_means):.4f} ({lm_std_pct:.2f}%)")
    result["lm_std_pct"] = f"{lm_std_pct:.2f}"
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
