"""lm-eval throughput: pd-lightning's StudentLM against lm-eval's own ``hf`` model on the same exported student.

One run, side by side, interleaved repetitions (ours then theirs within each repetition, the order alternating):

* ``loglik``: multiple-choice log-likelihood requests (HellaSwag-like: a real-text context, 4 continuations).
* ``generate``: ``generate_until`` requests (greedy, a stop string that never occurs, ``max_gen_toks`` tokens).
* ``kv``: our greedy decoding of ``--kv_tokens`` new tokens with the KV cache against recomputing the whole
  sequence at every step (``use_cache=False``), same prompts.

Ratios are ours / theirs in requests per second (and cache / no cache for ``kv``), paired per repetition; the
RESULT line gives their medians. Both backends run the same fp32 weights on the same device with the same batch size.

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
    from pd_lightning.data.tokenizer import train_bpe
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


def requests(tok, texts: list[str], n_q: int, n_gen: int, ctx_tokens: int, max_gen: int):
    from lm_eval.api.instance import Instance

    words = " ".join(texts).split()
    ll, gen = [], []
    for q in range(n_q):
        start = (q * 997) % (len(words) - 400)
        ctx = tok.decode(tok.encode(" ".join(words[start : start + 300]))[:ctx_tokens])
        for c in range(4):
            cont = " " + " ".join(words[start + 300 + 7 * c : start + 300 + 7 * c + 5 + c])
            ll.append(Instance("loglikelihood", {}, (ctx, cont), len(ll)))
    for g in range(n_gen):
        start = (g * 1531 + 77) % (len(words) - 400)
        ctx = tok.decode(tok.encode(" ".join(words[start : start + 300]))[: ctx_tokens - 16 * g])
        kwargs = {"until": ["@@@@never@@@@"], "max_gen_toks": max_gen, "do_sample": False}
        gen.append(Instance("generate_until", {}, (ctx, kwargs), g))
    return ll, gen


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--n_embd", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=8)
    p.add_argument("--n_kv", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--questions", type=int, default=32, help="multiple-choice questions (4 requests each)")
    p.add_argument("--ctx_tokens", type=int, default=192)
    p.add_argument("--gen_requests", type=int, default=8)
    p.add_argument("--max_gen", type=int, default=64)
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
        ours = StudentLM(model.to(args.device), tok, batch_size=args.batch_size, max_length=2048, progress=False)
        theirs = HFLM(pretrained=str(work / "hf"), dtype="float32", device=args.device,
                      batch_size=args.batch_size, max_length=2048)  # fmt: skip
        ll, gen = requests(tok, texts, args.questions, args.gen_requests, args.ctx_tokens, args.max_gen)
        kv_prompts = [tok.encode(r.args[0])[: args.kv_prompt_tokens] for r in gen[: args.kv_batch]]
        print(
            f"student: {cfg.num_parameters() / 1e6:.1f}M params (n_embd {cfg.n_embd}, {cfg.n_layer} layers, "
            f"vocab {cfg.vocab_size}); device {args.device}; torch threads {torch.get_num_threads()}; "
            f"batch {args.batch_size}; {len(ll)} loglikelihood requests, {len(gen)} generate_until requests of "
            f"{args.max_gen} tokens; kv: {len(kv_prompts)} prompt(s) of {args.kv_prompt_tokens} tokens + "
            f"{args.kv_tokens} new tokens"
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
    print("RESULT " + " ".join(f"{k}={statistics.median(v):.2f}" for k, v in rows.items()))


if __name__ == "__main__":
    main()
