"""``LMEvalCallback`` (``--config callbacks/lm_eval.yaml``): benchmark scores reach the logger during training, the
run's losses are those of a run without it, a resumed run does not score a step twice, and 2-process DDP and FSDP2
runs log the scores a one-process scoring of the same weights gives."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pd_lightning.cli import main
from tests.test_train import CKPT, small_token_file, tiny_fit_args, train_losses

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "eval"
TASKS = ["piqa", "hellaswag", "gsm8k"]  # two multiple-choice tasks and one generation task


def callback_config(path: Path, **init_args) -> Path:
    """callbacks/lm_eval.yaml with the tiny test's settings (the file itself is what users compose)."""
    cfg = yaml.safe_load((ROOT / "callbacks" / "lm_eval.yaml").read_text())
    entry = cfg["trainer"]["callbacks+"][0]
    assert entry["class_path"] == "pd_lightning.eval.callback.LMEvalCallback"
    entry["init_args"].update({"tasks": TASKS, "data_dir": str(FIXTURES), "limit": 2, "max_gen_toks": 8,
                               "on_checkpoint": False, **init_args})  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def bench_rows(root: Path) -> dict[int, dict[str, float]]:
    """step -> {metric: value} of the ``bench/*`` metrics in the run's CSV log."""
    out: dict[int, dict[str, float]] = {}
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if k.startswith("bench/") and v not in ("", None)}
            if values:
                out.setdefault(int(row["step"]), {}).update(values)
    return out


@pytest.fixture
def tokens(tmp_path, prepared) -> Path:
    return small_token_file(prepared, tmp_path / "tokens.h5")


def test_scores_reach_the_logger_and_training_is_unchanged(tmp_path, tokens, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = callback_config(tmp_path / "cb.yaml", every_n_steps=2)
    on, off = tmp_path / "on", tmp_path / "off"
    main(tiny_fit_args(tokens, on, 4, "--config", str(cfg), "--trainer.limit_val_batches", "0"))
    rng_on = torch.get_rng_state()
    main(tiny_fit_args(tokens, off, 4, "--trainer.limit_val_batches", "0"))
    assert torch.equal(torch.get_rng_state(), rng_on)  # the run with evaluations left the generator where it was
    bench = bench_rows(on)
    assert sorted(bench) == [2, 4], bench
    for step in (2, 4):
        assert set(bench[step]) == {*(f"bench/{t}" for t in TASKS), "bench/average"}
        assert bench[step]["bench/average"] == pytest.approx(sum(bench[step][f"bench/{t}"] for t in TASKS) / 3)
    assert "bench:" in capsys.readouterr().out
    # Evaluating (which reseeds Python/NumPy/torch inside lm-eval) does not change training: same losses, bit for bit.
    assert train_losses(on) == train_losses(off)


def test_resume_does_not_score_a_step_twice(tmp_path, tokens, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    cfg = callback_config(tmp_path / "cb.yaml", every_n_steps=3, on_checkpoint=True)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ckpt_args = [a.replace("every_n_train_steps=6", "every_n_train_steps=2") for a in CKPT]
    main(tiny_fit_args(tokens, full, 6, "--config", str(cfg), *ckpt_args))
    reference = bench_rows(full)
    # Scored at every save (2, 4, 6) and every 3 steps (3, 6): each step once.
    assert sorted(reference) == [2, 3, 4, 6], reference
    ckpt = next(full.rglob("step=4.ckpt"))
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("LMEvalCallback"))
    assert sorted(saved["scored"]) == [2, 3, 4]  # the step-4 score, made while saving, is in that checkpoint
    main(tiny_fit_args(tokens, resumed, 6, "--config", str(cfg), *ckpt_args, "--ckpt_path", str(ckpt)))
    again = bench_rows(resumed)
    assert sorted(again) == [6]  # steps 2, 3, 4 are not scored again
    assert again[6] == reference[6]  # the resumed run reached the same weights
    assert train_losses(resumed) == {s: v for s, v in train_losses(full).items() if s > 4}


def assert_logged_scores_equal_validate(prepared, tmp_path: Path, root: Path, tasks: list[str], limit: int) -> None:
    """The bench/* scores a multi-rank fit logged at step 2 equal one-process ``validate`` of its checkpoint."""
    logged = bench_rows(root)[2]
    ckpt = next(root.rglob("*.ckpt"))
    assert ckpt.is_file() and torch.load(ckpt, weights_only=True)["global_step"] == 2
    out = tmp_path / "one.json"
    vargs = tiny_fit_args(prepared["tokens"], tmp_path / "v", 2, "--trainer.limit_val_batches", "1")
    vargs[0] = "validate"
    main([*vargs, "--ckpt_path", str(ckpt), "--eval.tasks", json.dumps(tasks), "--eval.data_dir", str(FIXTURES),
          "--eval.limit", str(limit), "--eval.max_gen_toks", "8", "--eval.output", str(out)])  # fmt: skip
    one = json.loads(out.read_text())
    assert {t: logged[f"bench/{t}"] for t in tasks} == pytest.approx(one["scores"], abs=1e-6)
    assert logged["bench/average"] == pytest.approx(one["average"], abs=1e-6)


def test_ddp_scores_equal_one_process_scores(tmp_path, prepared, monkeypatch, capsys):
    """Two gloo ranks each score half the requests; the logged scores equal ``validate`` of the same checkpoint in
    one process (the weights differ from a one-process run's, since each rank trains on its own half of the data)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    tasks = ["piqa", "mmlu", "gsm8k"]
    cfg = callback_config(tmp_path / "cb.yaml", every_n_steps=2, tasks=tasks, limit=3)
    root = tmp_path / "ddp"
    args = tiny_fit_args(prepared["tokens"], root, 2, "--config", str(cfg), "--trainer.strategy", "ddp",
                         "--trainer.devices", "2", "--trainer.limit_val_batches", "0")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_logged_scores_equal_validate(prepared, tmp_path, root, tasks, limit=3)


def test_fsdp2_scores_equal_one_process_scores(tmp_path, prepared, monkeypatch):
    """FSDP2 (``configs/trainer/fsdp2.yaml``, 2 gloo ranks, parameters sharded as DTensors): each rank scores a padded
    share in lockstep (every rank in every forward, generation included); the logged scores equal ``validate`` of the
    same weights in one process (a full-state ``.ckpt``: ``save_distributed_checkpoint false``).

    piqa + c3 at limit 2 make 11 log-likelihood requests: rank 0 scores 6, rank 1 scores 5 plus a copy of its last
    (merged with it), so with batch 1 the ranks' real forwards differ (6 vs 5); without the lockstep dummy forward the
    run fails (measured: gloo "Connection reset by peer"). gsm8k scores 0 in both (a 2-step tiny model), so it shows
    that generation runs under FSDP2, not that its text matches (``test_sharded_requests_equal_one_process`` does)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    tasks = ["piqa", "c3", "gsm8k"]
    cfg = callback_config(tmp_path / "cb.yaml", every_n_steps=2, tasks=tasks, limit=2, batch_size=1)
    root = tmp_path / "fsdp2"
    args = tiny_fit_args(prepared["tokens"], root, 2, "--config", str(cfg),
                         "--config", str(ROOT / "configs" / "trainer" / "fsdp2.yaml"), "--trainer.accelerator", "cpu",
                         "--trainer.strategy.init_args.save_distributed_checkpoint", "false",
                         "--trainer.devices", "2", "--trainer.limit_val_batches", "0")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    # A collective one rank never joins would hang: the timeout fails the test instead.
    run = subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], env=env, capture_output=True, text=True,
                         cwd=ROOT, timeout=300)  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert_logged_scores_equal_validate(prepared, tmp_path, root, tasks, limit=2)


def test_preserved_training_state_restores_modes_and_random_states():
    import random

    import numpy as np

    from pd_lightning.eval.callback import preserved_training_state

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a submodule deliberately in eval mode stays so
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    with preserved_training_state(net):
        net.eval()
        random.seed(123), np.random.seed(123), torch.manual_seed(123)  # what lm-eval does
        torch.rand(5)
    assert net.training and not net[1].training and net[0].training
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_sharded_requests_equal_one_process(tmp_path, prepared):
    """ShardedLM on 2 gloo ranks: every rank gets every answer, equal to one process's (log-likelihoods, greedy flags,
    generated text), with 7, 3 and 1 requests (shares padded). With lockstep both ranks run the same number of
    forwards, as FSDP needs (without it they need not: the two shares differ in length and generation stops)."""
    from tests.workers.sharded_lm import build

    out = tmp_path / "res"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = ROOT / "tests" / "workers" / "sharded_lm.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(worker), str(out), str(prepared["tokenizer"])]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lm, ll, gen, one = build(str(prepared["tokenizer"]))
    reference = {"ll": lm.loglikelihood(ll), "gen": lm.generate_until(gen), "one": lm.generate_until(one)}
    for lockstep in (0, 1):
        ranks = [json.loads((tmp_path / f"res.{lockstep}.{r}.json").read_text()) for r in range(2)]
        for got in ranks:
            assert [g for _, g in got["ll"]] == [g for _, g in reference["ll"]]
            assert [v for v, _ in got["ll"]] == pytest.approx([v for v, _ in reference["ll"]], abs=1e-5)
            assert got["gen"] == reference["gen"] and got["one"] == reference["one"]
        if lockstep:
            assert ranks[0]["forwards"] == ranks[1]["forwards"] and ranks[0]["forwards"]["gen"] > 0


def test_callback_refuses_bad_input_before_training(tmp_path, tokens, capsys):
    cases = [({"tasks": ["piqa", "nope"]}, "unknown task 'nope'"),
             ({"data_dir": str(tmp_path / "missing")}, str(tmp_path / "missing")),
             ({"num_fewshot": -1}, "LMEvalCallback num_fewshot must be >= 0, got -1"),
             ({"num_fewshot": {"arc": 1}}, "LMEvalCallback num_fewshot: unknown task 'arc'"),
             ({"num_fewshot": {"gsm8k": 99}}, "gsm8k: 99-shot needs 99 rows in"),
             ({"limit": 2.5}, "LMEvalCallback limit must be a number of documents")]  # fmt: skip
    for i, (init_args, expected) in enumerate(cases):
        cfg = callback_config(tmp_path / f"cb{i}.yaml", every_n_steps=1, **init_args)
        with pytest.raises(SystemExit) as e:
            main(tiny_fit_args(tokens, tmp_path / f"run{i}", 2, "--config", str(cfg)))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("pd-lightning: error:") and expected in err[-1], err[-3:]
        assert not list((tmp_path / f"run{i}").rglob("*.ckpt"))


def test_no_scoring_while_stopping_on_sigterm(monkeypatch):
    """The SIGTERM checkpoint (saved on one rank's exception path) must not start an evaluation with collectives."""
    from types import SimpleNamespace

    from pd_lightning.eval.callback import LMEvalCallback

    cb = LMEvalCallback(tasks=["piqa"], every_n_steps=1, on_checkpoint=True)
    calls = []
    monkeypatch.setattr(cb, "score", lambda trainer, module: calls.append(trainer.global_step))
    for sigterm in (True, False):
        trainer = SimpleNamespace(global_step=4, received_sigterm=sigterm, state=SimpleNamespace(fn="fit"))
        cb.on_save_checkpoint(trainer, None, {"callbacks": {}})
        cb.on_train_batch_end(trainer, None, None, None, 0)
    assert calls == [4, 4]  # only the two calls without SIGTERM
