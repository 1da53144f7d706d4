"""lm-eval throughput: pd-lightning's StudentLM against lm-eval's own ``hf`` model on the same exported student, on
requests of the benchmarks' real lengths.

One run, side by side, interleaved repetitions (ours then theirs within each repetition, the order alternating):

* ``loglik``: one ``loglikelihood`` call holding the multiple-choice requests of three real shapes (lm-eval sends
  every task's requests of a type in one call): MMLU 5-shot (prompts of ~450–500 tokens, the 4 one-token answers
  " A" … " D"), C3 / C-Eval 5-shot (prompts of ~2,000–4,000 tokens, 4 choices of a few tokens) and HellaSwag 0-shot
  (~100-token contexts, 4 endings of ~20 tokens).
* ``generate``: GSM8k 8-shot ``generate_until`` requests (prompts of ~2,000–2,300 tokens, greedy, a stop string that
  never occurs, so both generate ``--max_gen`` tokens).
* ``kv``: our greedy decoding of ``--kv_tokens`` new tokens with the KV cache against recomputing the whole
  sequence at every step (``use_cache=False``), same prompts.

Neither backend is given a maximum length: both take the export's ``max_position_embeddings`` (4,096), as a user's
run would. Ratios are ours / theirs in requests per second (and cache / no cache for ``kv``), paired per repetition;
the RESULT line gives their medians and minima. Both run the same fp32 weights on the same device and batch size.
The default student is the demo's shape (preset ``demo``: n_embd 128, 4 layers, vocabulary 4,096).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eval_throughput.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def _texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def build(workdir: Path, args) -> tuple:
    from pd_lightning.corpus.tokenizer import train_bpe
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.model.hf import export_hf
    from pd_lightning.model.transformer import Transformer

    texts = _texts()
    tok = train_bpe(texts, args.vocab, workdir / "tok")
    torch.manual_seed(0)
    cfg = StudentConfig(
        vocab_size=len(tok), n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        n_query_groups=args.n_kv, intermediate_size=int(args.n_embd * 8 / 3) // 16 * 16,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    export_hf(model, workdir / "hf", tokenizer_dir=workdir / "tok")
    return model, tok, texts, cfg


def requests(tok, texts: list[str], args):
    """The loglikelihood and generate_until requests, at the real benchmarks' prompt lengths (module docstring)."""
    import random

    from lm_eval.api.instance import Instance

    ids = tok.encode(" ".join(texts))
    rng = random.Random(0)

    def text(n_tokens: int) -> str:
        start = rng.randrange(len(ids) - n_tokens)
        return tok.decode(ids[start : start + n_tokens])

    ll, gen = [], []
    for _ in range(args.mmlu):  # MMLU 5-shot: ~450-500 tokens, one-token answers
        ctx = text(rng.randint(450, 500)) + "\nAnswer:"
        ll += [Instance("loglikelihood", {}, (ctx, f" {c}"), len(ll)) for c in "ABCD"]
    for _ in range(args.long_mc):  # C3 / C-Eval 5-shot: ~2,000-4,000 tokens, short choice texts
        ctx = text(rng.randint(2000, 3900)) + "\n答案："
        ll += [Instance("loglikelihood", {}, (ctx, text(rng.randint(3, 8))), len(ll)) for _ in range(4)]
    for _ in range(args.hellaswag):  # HellaSwag 0-shot: ~100-token contexts, ~20-token endings
        ctx = text(rng.randint(80, 120))
        ll += [Instance("loglikelihood", {}, (ctx, " " + text(rng.randint(15, 25))), len(ll)) for _ in range(4)]
    for g in range(args.gen_requests):  # GSM8k 8-shot: ~2,000-2,300 tokens
        kwargs = {"until": ["@@@@never@@@@"], "max_gen_toks": args.max_gen, "do_sample": False}
        gen.append(Instance("generate_until", {}, (text(rng.randint(2000, 2300)) + "\nAnswer:", kwargs), g))
    return ll, gen


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_kv", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--mmlu", type=int, default=16, help="MMLU-like 5-shot questions (4 requests each)")
    p.add_argument("--long_mc", type=int, default=8, help="C3/C-Eval-like 5-shot questions (4 requests each)")
    p.add_argument("--hellaswag", type=int, default=16, help="HellaSwag-like questions (4 requests each)")
    p.add_argument("--gen_requests", type=int, default=8, help="GSM8k-like 8-shot generations")
    p.add_argument("--max_gen", type=int, default=256)
    p.add_argument("--kv_tokens", type=int, default=256)
    p.add_argument("--kv_batch", type=int, default=1)
    p.add_argument("--kv_prompt_tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import transformers
    from lm_eval.models.huggingface import HFLM

    from pd_lightning.eval.lm import StudentLM
    from pd_lightning.model.generate import greedy_generate

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, tok, texts, cfg = build(work, args)
        ours = StudentLM(model.to(args.device), tok, batch_size=args.batch_size, progress=False)
        theirs = HFLM(pretrained=str(work / "hf"), dtype="float32", device=args.device, batch_size=args.batch_size)
        assert ours.max_length == theirs.max_length, (ours.max_length, theirs.max_length)
        ll, gen = requests(tok, texts, args)
        ll_len = sorted(len(tok.encode(r.args[0] + r.args[1])) for r in ll)
        gen_len = sorted(len(tok.encode(r.args[0])) for r in gen)
        kv_prompts = [tok.encode(r.args[0])[: args.kv_prompt_tokens] for r in gen[: args.kv_batch]]
        print(
            f"student: {cfg.num_parameters() / 1e6:.1f}M params (n_embd {cfg.n_embd}, {cfg.n_layer} layers, "
            f"vocab {cfg.vocab_size}); device {args.device}; torch threads {torch.get_num_threads()}; "
            f"batch {args.batch_size}; max length {ours.max_length} (both, from the export); {len(ll)} loglikelihood "
            f"requests of {ll_len[0]}-{ll_len[-1]} tokens (median {ll_len[len(ll_len) // 2]}), {len(gen)} "
            f"generate_until requests of {gen_len[0]}-{gen_len[-1]}-token prompts + {args.max_gen} tokens; kv: "
            f"{len(kv_prompts)} prompt(s) of {args.kv_prompt_tokens} tokens + {args.kv_tokens} new tokens"
        )
        # Warm-up (also checks agreement once).
        a = ours.loglikelihood(ll, disable_tqdm=True)
        b = theirs.loglikelihood(ll, disable_tqdm=True)
        worst = max(abs(x[0] - y[0]) for x, y in zip(a, b))
        same_gen = ours.generate_until(gen[:2], disable_tqdm=True) == theirs.generate_until(gen[:2], disable_tqdm=True)
        print(f"agreement: max |loglik ours - hf| = {worst:.2e}; first generations identical: {same_gen}")

        n_kv = args.kv_tokens
        t = {k: [] for k in ("ll_ours", "ll_hf", "gen_ours", "gen_hf", "kv_on", "kv_off")}
        for rep in range(args.reps):
            pairs = [
                ("ll_ours", lambda: ours.loglikelihood(ll, disable_tqdm=True)),
                ("ll_hf", lambda: theirs.loglikelihood(ll, disable_tqdm=True)),
                ("gen_ours", lambda: ours.generate_until(gen, disable_tqdm=True)),
                ("gen_hf", lambda: theirs.generate_until(gen, disable_tqdm=True)),
                ("kv_on", lambda: greedy_generate(model, kv_prompts, n_kv)),
                ("kv_off", lambda: greedy_generate(model, kv_prompts, n_kv, use_cache=False)),
            ]
            for i in range(0, len(pairs), 2):
                first, second = (pairs[i], pairs[i + 1]) if rep % 2 == 0 else (pairs[i + 1], pairs[i])
                for key, fn in (first, second):
                    t[key].append(timed(fn)[0])
            print(
                f"rep {rep}: loglik ours {t['ll_ours'][-1]:.3f}s hf {t['ll_hf'][-1]:.3f}s | generate ours "
                f"{t['gen_ours'][-1]:.3f}s hf {t['gen_hf'][-1]:.3f}s | kv on {t['kv_on'][-1]:.3f}s off "
                f"{t['kv_off'][-1]:.3f}s",
                flush=True,
            )

    def ratios(num: str, den: str) -> list[float]:  # time(den) / time(num) = rate(num) / rate(den)
        return [d / n for n, d in zip(t[num], t[den])]

    rows = {
        "loglik_ratio": ratios("ll_ours", "ll_hf"),
        "generate_ratio": ratios("gen_ours", "gen_hf"),
        "kv_speedup": ratios("kv_on", "kv_off"),
    }
    med = {k: statistics.median(v) for k, v in t.items()}
    print(
        f"median requests/s: loglik ours {len(ll) / med['ll_ours']:.1f} hf {len(ll) / med['ll_hf']:.1f}; "
        f"generate ours {len(gen) / med['gen_ours']:.2f} hf {len(gen) / med['gen_hf']:.2f}; "
        f"kv tokens/s with cache {len(kv_prompts) * args.kv_tokens / med['kv_on']:.0f} "
        f"without {len(kv_prompts) * args.kv_tokens / med['kv_off']:.0f}"
    )
    for k, v in rows.items():
        print(f"{k}: median {statistics.median(v):.2f} (min {min(v):.2f}, max {max(v):.2f}) over {len(v)} reps")
    result = {k: statistics.median(v) for k, v in rows.items()}
    result.update({"loglik_min": min(rows["loglik_ratio"]), "generate_min": min(rows["generate_ratio"])})
    print("RESULT " + " ".join(f"{k}={v:.2f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
