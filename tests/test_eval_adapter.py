"""StudentLM (the lm-eval adapter) against a naive fp64 reference and against lm-eval's own `hf` model."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import eval_fixtures  # sets the offline HF environment before lm-eval / datasets are imported
from tests.eval_fixtures import ALL_TASKS, FIXTURES, instances, tiny_student

# isort: split
from pd_lightning.eval.lm import StudentLM, load_student_checkpoint
from pd_lightning.eval.runner import evaluate

eval_ckpt = eval_fixtures.eval_ckpt  # the module-scoped checkpoint fixture


@pytest.fixture(scope="module")
def tok(prepared):
    from pd_lightning.corpus.tokenizer import load_tokenizer

    return load_tokenizer(prepared["tokenizer"])


def _naive_loglik(model, tok, context: str, continuation: str, max_length: int) -> tuple[float, bool]:
    """log p(continuation | context) in fp64, one request at a time, following lm-eval's tokenisation rule
    (trailing context spaces move to the continuation; an empty context is the EOS token)."""
    if context:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = tok.encode(context + continuation), tok.encode(context)
        cont = whole[len(ctx) :]
    else:
        whole, cont = [tok.eos_token_id] + tok.encode(continuation), tok.encode(continuation)
    inp = whole[-(max_length + 1) :][:-1]
    with torch.no_grad():
        logp = torch.log_softmax(model.double()(torch.tensor([inp]))[0].double(), dim=-1)
    model.float()
    rows = logp[len(inp) - len(cont) :]
    target = torch.tensor(cont)
    return float(rows[torch.arange(len(cont)), target].sum()), bool((rows.argmax(-1) == target).all())


def test_loglikelihood_equals_naive_fp64_reference(tok):
    model = tiny_student(len(tok), seed=1)
    lm = StudentLM(model, tok, batch_size=3, max_length=24, progress=False)
    long_context = "The data model of the language: objects, values and types. " * 4  # > 24 tokens: cut left
    requests = [
        ("The quick brown fox", " jumps over the dog"),
        ("The quick brown fox ", "jumps"),  # trailing space moves to the continuation
        ("", "Hello world"),  # empty context: conditioned on EOS
        ("Question: which is larger?\nAnswer:", " A"),
        ("Question: which is larger?\nAnswer:", " B"),  # shares its model input with the request above
        ("Question: which is larger?\nAnswer:", " C D"),
        (long_context, " and the end"),
    ]
    got = lm.loglikelihood(instances("loglikelihood", requests))
    assert len(got) == len(requests)
    for (ctx, cont), (lp, greedy) in zip(requests, got):
        ref_lp, ref_greedy = _naive_loglik(model, tok, ctx, cont, 24)
        assert lp == pytest.approx(ref_lp, abs=1e-4), (ctx, cont)
        assert greedy == ref_greedy
    assert model.training is False


def test_shared_prefix_scoring_equals_naive_fp64_reference(tok):
    """The choices of one question (several tokens each, as C3's and HellaSwag's) share a long prefix: it runs once
    into a KV cache and each choice's suffix against it. Each log-likelihood still equals the naive fp64 forward of
    the whole row, and the row path's; rows of different lengths, a one-token choice, and more rows than the batch."""
    model = tiny_student(len(tok), seed=2)
    context = "Objects are Python's abstraction for data. All data is represented by objects. " * 6
    choices = [" and relations", " between objects of the program", " x", " data model", " types and values of them"]
    requests = [(context, c) for c in choices] + [("Another question entirely?", " yes"), (context[:90], " no")]
    shared = StudentLM(model, tok, batch_size=2, max_length=512, progress=False)
    shared.shared_prefix_min = 16  # the long context is shared; the short ones are not
    plain = StudentLM(model, tok, batch_size=2, max_length=512, progress=False)
    plain.shared_prefix_min = 10**9
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape), with_kwargs=True)
    got = shared.loglikelihood(instances("loglikelihood", requests))
    handle.remove()
    n_prefix = len(tok.encode(context.rstrip())) - 1  # lm-eval moves the trailing space to the continuation
    long_calls = [shape for shape in calls if shape[1] >= n_prefix]
    assert long_calls == [(1, n_prefix)]  # the shared context ran once, batch 1; the choices only as suffixes
    ref = plain.loglikelihood(instances("loglikelihood", requests))
    for (ctx, cont), (lp, greedy), (lp_row, greedy_row) in zip(requests, got, ref):
        ref_lp, ref_greedy = _naive_loglik(model, tok, ctx, cont, 512)
        assert lp == pytest.approx(ref_lp, abs=1e-4) and lp == pytest.approx(lp_row, abs=1e-4), cont
        assert greedy == ref_greedy == greedy_row


def test_training_mode_and_rng_are_restored(tok):
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.module import DistillationModule

    torch.manual_seed(0)
    module = DistillationModule(StudentConfig(preset="tiny", vocab_size=len(tok)))
    module.train()
    lm = StudentLM.from_module(module, tok, batch_size=4, max_length=256, max_gen_toks=8, progress=False)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    out = evaluate(lm, ["piqa", "gsm8k"], str(FIXTURES), limit=2)
    assert set(out["scores"]) == {"piqa", "gsm8k"}
    assert module.training and all(m.training for m in module.modules())
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_checkpoint_loading_and_refusals(eval_ckpt, tmp_path, prepared, tok):
    from pd_lightning.corpus.tokenizer import tokenizer_fingerprint, train_bpe

    lm = StudentLM.from_checkpoint(eval_ckpt, progress=False)  # tokenizer found through the run's config.yaml
    assert tokenizer_fingerprint(lm.tokenizer) == tokenizer_fingerprint(tok)
    # The declared length (export-hf's max_position_embeddings), not the 64-token training length it records.
    assert lm.max_length == 4096 and lm.trained_length == 64
    with pytest.raises(FileNotFoundError, match="checkpoint .*missing.ckpt.* does not exist"):
        StudentLM.from_checkpoint(tmp_path / "missing.ckpt")
    other = tmp_path / "other_tok"
    train_bpe(["completely different text for another tokenizer"] * 50, 300, other)
    with pytest.raises(ValueError, match="was trained with tokenizer .* the given tokenizer is"):
        StudentLM.from_checkpoint(eval_ckpt, tokenizer=str(other))
    with pytest.raises(ValueError, match="exactly one of"):
        StudentLM(tiny_student(len(tok)), tok, checkpoint=str(eval_ckpt))


def test_all_seven_tasks_match_lm_eval_hf_backend(eval_ckpt, tmp_path, tok):
    """Parity: the checkpoint through StudentLM and its `export-hf` folder through lm-eval's own `hf` model score
    the fixture tasks (generation included) with per-request log-likelihoods within 1e-4, identical generations
    and identical metrics. PIQA's accuracy is also recomputed from naive fp64 log-likelihoods."""
    from lm_eval.models.huggingface import HFLM

    from pd_lightning.cli import main

    model, record = load_student_checkpoint(eval_ckpt)
    folder = tmp_path / "hf"
    main(["export-hf", "--ckpt", str(eval_ckpt), "--output", str(folder), "--tokenizer", record["tokenizer_path"]])
    # No max_length on either side: both take the student's declared length (the export's max_position_embeddings).
    ours = StudentLM.from_checkpoint(eval_ckpt, batch_size=4, progress=False)
    theirs = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=4)
    assert ours.max_length == theirs.max_length == 4096
    a = evaluate(ours, ALL_TASKS, str(FIXTURES), log_samples=True)
    b = evaluate(theirs, ALL_TASKS, str(FIXTURES), log_samples=True)

    assert set(a["scores"]) == set(ALL_TASKS)
    assert a["results"] == b["results"] and a["scores"] == b["scores"] and a["subtasks"] == b["subtasks"]
    assert a["average"] == pytest.approx(np.mean(list(a["scores"].values())))
    n_ll = n_gen = 0
    for task, docs in a["samples"].items():
        for x, y in zip(docs, b["samples"][task], strict=True):
            assert x["doc_id"] == y["doc_id"]
            for rx, ry in zip(x["resps"], y["resps"], strict=True):
                if isinstance(rx[0], str):
                    assert rx[0] == ry[0]
                    n_gen += 1
                else:
                    assert rx[0][0] == pytest.approx(ry[0][0], abs=1e-4) and rx[0][1] == ry[0][1]
                    n_ll += 1
    assert n_gen >= 2 and n_ll >= 40
    assert len(a["samples"]["gsm8k"][0]["resps"][0][0]) > 0  # something was generated

    # PIQA from first principles: argmax of the fp64 log-likelihood of " " + solution after the prompt (acc), and
    # of it divided by the solution's length in characters (acc_norm, lm-eval's definition).
    rows = [json.loads(x) for x in (FIXTURES / "piqa" / "validation.jsonl").read_text().splitlines()]
    acc, acc_norm = [], []
    for r in rows:
        ctx = f"Question: {r['goal']}\nAnswer:"
        lls = [_naive_loglik(model, tok, ctx, " " + s, 512)[0] for s in (r["sol1"], r["sol2"])]
        acc.append(int(np.argmax(lls)) == r["label"])
        acc_norm.append(int(np.argmax([ll / len(s) for ll, s in zip(lls, (r["sol1"], r["sol2"]))])) == r["label"])
    assert a["results"]["piqa"]["acc"] == pytest.approx(np.mean(acc))
    assert a["results"]["piqa"]["acc_norm"] == pytest.approx(np.mean(acc_norm))


def test_rolling_and_generation_match_lm_eval_hf_backend(tmp_path, tok, prepared):
    """loglikelihood_rolling over several windows and generate_until with stop strings, request by request."""
    from lm_eval.models.huggingface import HFLM

    from pd_lightning.model.hf import export_hf

    model = tiny_student(len(tok), seed=2)
    export_hf(model, tmp_path, tokenizer_dir=prepared["tokenizer"])
    ours = StudentLM(model, tok, batch_size=2, max_length=32, progress=False)
    theirs = HFLM(pretrained=str(tmp_path), dtype="float32", device="cpu", batch_size=2, max_length=32)
    docs = [("A short document.",), ("A longer document that needs several windows of thirty-two tokens. " * 3,)]
    r_ours = ours.loglikelihood_rolling(instances("loglikelihood_rolling", docs))
    r_theirs = theirs.loglikelihood_rolling(instances("loglikelihood_rolling", docs))
    assert r_ours == pytest.approx(r_theirs, abs=1e-4)
    # One window: the rolling log-likelihood is the EOS-conditioned log-likelihood of the whole string.
    assert r_ours[0] == pytest.approx(_naive_loglik(model, tok, "", docs[0][0], 32)[0], abs=1e-4)

    gen = [
        ("def f(x):\n", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
        ("The", {"until": ["e", "Question:"], "max_gen_toks": 12, "do_sample": False}),
        ("class A:", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}),
    ]
    g_ours = ours.generate_until(instances("generate_until", gen))
    g_theirs = theirs.generate_until(instances("generate_until", gen))
    assert g_ours == g_theirs
    assert "e" not in g_ours[1]  # cut at the stop string
    with pytest.raises(ValueError, match="only greedy"):
        ours.generate_until(instances("generate_until", [("x", {"do_sample": True, "temperature": 1.0})]))


def test_lm_eval_command_line(eval_ckpt, tmp_path):
    """`pd-lightning-lm-eval --model pd-lightning ...` is lm-eval's CLI: it writes lm-eval's results file."""
    exe = Path(sys.executable).parent / "pd-lightning-lm-eval"
    cmd = [str(exe), "--model", "pd-lightning", "--model_args", f"checkpoint={eval_ckpt},max_length=256",
           "--tasks", "piqa,gsm8k", "--data_dir", str(FIXTURES), "--limit", "2", "--device", "cpu",
           "--gen_kwargs", "max_gen_toks=8", "--output_path", str(tmp_path / "out")]  # fmt: skip
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    data = json.loads(results.read_text())
    assert set(data["results"]) == {"piqa", "gsm8k"} and "acc,none" in data["results"]["piqa"]

    bad = subprocess.run([*cmd[:7], "--data_dir", str(tmp_path / "nope")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    nope = str(tmp_path / "nope")
    expected = f"pd-lightning-lm-eval: error: eval data folder {nope!r} does not exist (write it with `pd-lightning eval-data`)"  # noqa: E501
    assert bad.stderr.strip().splitlines() == [expected]
    missing = [*cmd[:3], "--model_args", f"checkpoint={tmp_path / 'gone.ckpt'}", *cmd[5:9], "--output_path",
               str(tmp_path / "out2")]  # fmt: skip
    bad = subprocess.run(missing, capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].endswith("gone.ckpt' does not exist")
    assert not (tmp_path / "out2").exists()


def test_lm_eval_command_line_num_fewshot_and_tokenizerless_folder(eval_ckpt, tmp_path):
    """lm-eval ignores --num_fewshot for a task whose YAML says 0 shots: the wrapper writes the count into the task
    YAMLs, so `--num_fewshot 1` really gives piqa one shot. A model folder without a tokenizer is refused at once."""
    exe = Path(sys.executable).parent / "pd-lightning-lm-eval"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(exe), "--model", "pd-lightning", "--model_args", f"checkpoint={eval_ckpt},max_length=256",
           "--tasks", "piqa", "--data_dir", str(FIXTURES), "--limit", "2", "--device", "cpu", "--num_fewshot", "1",
           "--output_path", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(results.read_text())["n-shot"]["piqa"] == 1

    folder = tmp_path / "exported"  # what `export-hf` writes without --tokenizer: weights and config only
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    bad = subprocess.run([str(exe), "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks", "piqa",
                          "--data_dir", str(FIXTURES)], capture_output=True, text=True, env=env)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"pd-lightning-lm-eval: error: --model_args pretrained={str(folder)!r} holds no tokenizer; export it with "
        "`pd-lightning export-hf … --tokenizer <folder>` or add tokenizer=<folder> to --model_args"
    ]


def test_generation_longer_than_the_model_is_refused_as_lm_eval_hf_refuses_it(tok):
    """max_gen_toks >= max_length leaves no room for the prompt: lm-eval's hf model asserts; we refused nothing and
    generated past the model's length with the prompt kept whole."""
    lm = StudentLM(tiny_student(len(tok)), tok, max_length=32, max_gen_toks=32, progress=False)
    reqs = instances("generate_until", [("the module", {"until": ["\n"], "do_sample": False})])
    with pytest.raises(ValueError, match="max_gen_toks 32 leaves no room for the prompt in .* maximum length 32"):
        lm.generate_until(reqs)
    lm = StudentLM(tiny_student(len(tok)), tok, max_length=32, max_gen_toks=8, progress=False)
    long_prompt = "the module " * 40
    (out,) = lm.generate_until(instances("generate_until", [(long_prompt, {"until": ["\n"], "do_sample": False})]))
    assert isinstance(out, str)
    full, seen = lm.request_lengths[-1]
    assert full > 32 and seen == 32 - 8  # the prompt is cut to leave room for the generated tokens, as lm-eval does
