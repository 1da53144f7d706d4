"""How long scoring the seven full benchmarks at the paper's shots takes for the demo student, and what dominates.

The real benchmark files cannot be downloaded here, so each task is timed on documents of the real layout and prompt
lengths (``tests/fixtures/make_eval_real.py`` at ``--scale``: 5-shot MMLU, C-Eval and C3, 8-shot GSM8k, 0-shot
HellaSwag / WinoGrande / PIQA) through the path ``validate`` uses (lm-eval + ``StudentLM``, the declared 4,096-token
maximum length), and the seconds per document are multiplied by the full evaluation splits' document counts:

    HellaSwag val 10,042 · WinoGrande val 1,267 · PIQA val 1,838 · MMLU test 14,042 · C3 val 3,816 ·
    C-Eval val 1,346 · GSM8k test 1,319

The student is the demo's shape (preset ``demo``, 1.8M parameters) over a 4,096-entry BPE trained on the embedded
corpus, or a trained checkpoint (``--ckpt``; its tokenizer from the run). Weights do not change the time of a forward;
they change how soon GSM8k generation stops: untrained weights never write "Question:", so every GSM8k answer runs
the full 256 tokens (the worst case, said in the output).

    .venv/bin/python benchmarks/eval_full_time.py [--scale 4] [--ckpt runs/demo/pdstar/…/last.ckpt]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

FULL_DOCS = {"hellaswag": 10_042, "winogrande": 1_267, "piqa": 1_838, "mmlu": 14_042, "c3": 3_816, "ceval": 1_346,
             "gsm8k": 1_319}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=4, help="documents timed per task: the fixture's rows x scale")
    p.add_argument("--ckpt", default=None, help="a trained student checkpoint (default: the demo shape, untrained)")
    p.add_argument("--batch_size", type=int, default=8)
    args = p.parse_args()

    os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="pd_eval_full_hf_"))
    from pd_lightning.eval.lm import StudentLM
    from pd_lightning.eval.runner import evaluate
    from pd_lightning.eval.scoring import length_summary
    from tests.fixtures.make_eval_real import main as make_data

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.ckpt:
            lm = StudentLM.from_checkpoint(args.ckpt, batch_size=args.batch_size, progress=False)
            what = f"checkpoint {args.ckpt}"
        else:
            from pd_lightning.corpus.builtin import builtin_documents
            from pd_lightning.corpus.tokenizer import train_bpe
            from pd_lightning.model.config import StudentConfig
            from pd_lightning.model.transformer import Transformer

            tok = train_bpe(list(builtin_documents()), 4096, work / "tok")
            torch.manual_seed(0)
            model = Transformer(StudentConfig(preset="demo", vocab_size=len(tok))).eval()
            lm = StudentLM(model, tok, batch_size=args.batch_size, progress=False, trained_length=256)
            what = "the demo shape, untrained (GSM8k answers run the full 256 tokens)"
        make_data(work / "data", scale=args.scale)
        n_params = lm.model.config.num_parameters()
        print(f"student: {what}; {n_params / 1e6:.1f}M parameters; max length {lm.max_length}; batch "
              f"{args.batch_size}; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPUs")  # fmt: skip
        rows = {}
        for task in FULL_DOCS:
            lm.request_lengths.clear()
            t0 = time.perf_counter()
            report = evaluate(lm, [task], str(work / "data"))
            seconds = time.perf_counter() - t0
            docs = int(report["config"]["n_samples"][task]["effective"])
            lengths = length_summary(lm.request_lengths, lm.max_length, None)
            median = statistics.median(seen for _, seen in lm.request_lengths)
            rows[task] = (docs, seconds, len(lm.request_lengths), median, lengths["longest"])
            est = seconds / docs * FULL_DOCS[task]
            print(f"{task:<10} {docs:>4} docs {len(lm.request_lengths):>5} requests (median {median:>6.0f} tokens, "
                  f"longest {lengths['longest']:>5}) {seconds:7.1f} s = {seconds / docs:6.3f} s/doc -> "
                  f"{FULL_DOCS[task]:>6,} docs ~ {est / 60:7.1f} min", flush=True)  # fmt: skip
    est = {t: s / d * FULL_DOCS[t] for t, (d, s, *_) in rows.items()}
    total = sum(est.values())
    order = sorted(est, key=est.get, reverse=True)
    print(f"full seven benchmarks ~ {total / 3600:.2f} h; largest shares: "
          + ", ".join(f"{t} {100 * est[t] / total:.0f}%" for t in order[:3]))  # fmt: skip
    print("RESULT full_hours=%.2f " % (total / 3600) + " ".join(f"{t}_min={est[t] / 60:.1f}" for t in FULL_DOCS))


if __name__ == "__main__":
    main()
