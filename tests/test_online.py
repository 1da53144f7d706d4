"""Online logits (issue 10): the logit recorder, the in-step frozen teacher and co-training, through the CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pd_lightning.cli import main
from tests.test_train import quiet_trainer_args, small_token_file, train_losses

HALF_STEP = math.log(1e6) / 16383 / 2  # the cache's -log p quantisation: at most half a step of error


def recorder_config(path: Path, output: Path, **init_args) -> Path:
    """callbacks/recorder.yaml with this test's settings (the file itself is what users compose)."""
    cfg = yaml.safe_load((Path(__file__).parents[1] / "callbacks" / "recorder.yaml").read_text())
    rec = cfg["trainer"]["callbacks+"][0]["init_args"]
    rec.update({"output": str(output), "last_tokens": None, **init_args})
    path.write_text(yaml.safe_dump(cfg))
    return path


def teacher_args(tokens: Path, root: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--seed_everything", "3",
        "--model.student.preset", "tiny",
        "--model.lr", "3e-3",
        "--model.loss_chunk_size", "40",  # several chunks per batch: the recorder sees the loss chunk by chunk
        "--data.class_path", "pd_lightning.corpus.datamodule.TokenDataModule",
        "--data.init_args.path", str(tokens),
        "--data.init_args.batch_size", "4",
        *quiet_trainer_args(root, steps),
        "--trainer.limit_val_batches", "0",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=1",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
        "--trainer.callbacks.dirpath", str(root),
        *extra,
    ]  # fmt: skip


def reference_target(ckpt: Path, tokens: np.ndarray, k: int, gamma: float = 0.5) -> dict[str, np.ndarray]:
    """Naive fp64 teacher statistics of the checkpoint's weights on ``tokens`` (S, L + 1): top-k log p, std of the
    logits (unbiased), entropy, tail mass and U_gamma over the full vocabulary."""
    from pd_lightning.module import DistillationModule

    module = DistillationModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False)
    model = module.model.double()
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens[:, :-1].astype(np.int64))).reshape(-1, model.output_weight.shape[0])
    logp = torch.log_softmax(logits, -1)
    top, ids = logp.topk(k, -1)
    p = logp.exp()
    return {
        "ids": ids.numpy(),
        "logp": logp.numpy(),
        "logprobs": top.numpy(),
        "std": logits.std(-1).numpy(),
        "entropy": -(p * logp).sum(-1).numpy(),
        "tail": (1 - top.exp().sum(-1)).numpy(),
        "u": p.pow(gamma).sum(-1).numpy(),
    }


def cached(cache_dir: Path) -> list[dict[str, np.ndarray]]:
    from pd_lightning.cache.reader import TeacherCache

    cache = TeacherCache(str(cache_dir))
    return [{k: v.numpy() for k, v in cache[i].items()} for i in range(len(cache))]


def matches(item: dict, ref: dict, rows: slice) -> bool:
    """The cached item equals the reference within the cache's precision (quantised log p, float16 statistics)."""
    # The kept ids are a top-k of the reference (ties within 1e-5 may swap), their values its log p at those ids.
    at_ids = np.take_along_axis(ref["logp"][rows], item["teacher_ids"], -1)
    ok = np.abs(item["teacher_logprobs"] - at_ids).max() <= HALF_STEP + 1e-5
    ok &= bool((at_ids.min(-1) >= ref["logprobs"][rows][:, -1] - 1e-5).all())
    ok &= np.abs(item["teacher_logprobs"] - ref["logprobs"][rows]).max() <= HALF_STEP + 1e-5
    for key, name in (("teacher_std", "std"), ("teacher_entropy", "entropy"), ("teacher_power_sum@0.5", "u")):
        ok &= np.allclose(item[key], ref[name][rows], rtol=1e-3, atol=1e-4)
    ok &= np.allclose(item["teacher_tail"], ref["tail"][rows], rtol=2e-3, atol=1e-4)
    return bool(ok)


def test_recorder_leaves_training_unchanged_latest_visit_wins_and_a_student_trains_from_it(tmp_path, prepared):
    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=8, n_val=4)  # 2 steps per epoch
    k, steps = 5, 6
    plain, rec = tmp_path / "plain", tmp_path / "rec"
    main(teacher_args(tokens, plain, steps))
    config = recorder_config(
        tmp_path / "recorder.yaml", tmp_path / "cache",
        processor={"class_path": "pd_lightning.distill.processors.TopPK", "init_args": {"p": 1.0, "k": k}},
        start_step=0, end_step=steps,
    )  # fmt: skip
    main([*teacher_args(tokens, rec, steps), "--config", str(config)])
    # 1. The teacher's training is unchanged: the same losses, bit for bit, and the same weights after every step.
    assert train_losses(rec) == train_losses(plain) and len(train_losses(rec)) == steps
    for step in range(1, steps + 1):
        a = torch.load(plain / f"step={step}.ckpt", weights_only=True)["state_dict"]
        b = torch.load(rec / f"step={step}.ckpt", weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # 2. Each of the 8 sequences was seen 3 times (epochs 0, 1, 2): recorded once, from its latest visit, i.e. with
    # the weights after step 4 (batch of step 5) or after step 5 (batch of step 6), never an earlier visit's.
    items = cached(tmp_path / "cache")
    assert len(items) == 8 and not (tmp_path / "cache" / ".recording").exists()
    order = np.load(tmp_path / "cache" / "recorded_sequences.npy")
    assert order.tolist() == list(range(8))
    all_tokens = np.stack([np.concatenate([it["input_ids"], it["labels"][-1:]]) for it in items])
    refs = {s: reference_target(rec / f"step={s}.ckpt", all_tokens, k) for s in (2, 3, 4, 5)}
    length = all_tokens.shape[1] - 1
    found = []
    for i, item in enumerate(items):
        rows = slice(i * length, (i + 1) * length)
        hit = [s for s, ref in refs.items() if matches(item, ref, rows)]
        found += hit
        assert len(hit) == 1 and hit[0] in (4, 5), (i, hit)
    assert sorted(found) == [4] * 4 + [5] * 4
    # 3. A student trains from the recorded cache exactly as from an offline one.
    student = tmp_path / "student"
    main([
        "fit", "--seed_everything", "1", "--model.student.preset", "tiny",
        "--model.loss", "pd_lightning.distill.losses.KLD",
        "--model.alpha", "pd_lightning.distill.schedules.Constant", "--model.alpha.alpha", "0.9",
        "--data.class_path", "pd_lightning.cache.datamodule.CacheDataModule",
        "--data.init_args.path", str(tmp_path / "cache"), "--data.init_args.batch_size", "4",
        *quiet_trainer_args(student, 4), "--trainer.limit_val_batches", "0",
    ])  # fmt: skip
    losses = train_losses(student)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses.values())


def predict_args(teacher: Path, tokens: Path, out: Path, k: int = 20) -> list[str]:
    return [
        "predict",
        "--model.teacher", str(teacher),
        "--model.processor", "pd_lightning.distill.processors.TopPK",
        "--model.processor.p", "0.95",
        "--model.processor.k", str(k),
        "--data.path", str(tokens),
        "--data.batch_size", "4",
        "--writer.output", str(out),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def in_step_args(tokens: Path, root: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--seed_everything", "5",
        "--model.student.preset", "tiny",
        "--model.loss", "pd_lightning.distill.losses.KLD",
        "--model.alpha", "pd_lightning.distill.schedules.Constant", "--model.alpha.alpha", "0.5",
        "--data.class_path", "pd_lightning.corpus.datamodule.TokenDataModule",
        "--data.init_args.path", str(tokens),
        "--data.init_args.batch_size", "4",
        *quiet_trainer_args(root, steps),
        "--trainer.limit_val_batches", "0",
        *extra,
    ]  # fmt: skip


def assert_in_step_equals_cache(teacher: Path, tokens: Path, cache_dir: Path) -> None:
    """The training step's own code path (DistillationModule._online_target) on the cache's first 4 sequences equals
    the cached targets within the cache's precision."""
    from pd_lightning.corpus.datamodule import TokenDataset
    from pd_lightning.corpus.prepare import TokenFile
    from pd_lightning.distill.processors import TopPK
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.module import DistillationModule

    items = cached(cache_dir)
    vocab = TokenFile(tokens).vocab_size
    module = DistillationModule(StudentConfig(preset="tiny", vocab_size=vocab), teacher=str(teacher),
                                teacher_processor=TopPK(0.95, 20))  # fmt: skip
    data = TokenDataset(TokenFile(tokens), "train")
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "labels", "sequence_index")}
    target, teacher_out = module._online_target(batch, alpha=0.5)
    assert teacher_out is None and target.ids.shape[0] == 4 * 64
    for i in range(4):
        item, rows = items[i], slice(i * 64, (i + 1) * 64)
        assert np.array_equal(item["input_ids"], batch["input_ids"][i].numpy())
        valid = np.isfinite(item["teacher_logprobs"])
        assert np.array_equal(valid, torch.isfinite(target.logprobs[rows]).numpy())  # same kept counts (top-p)
        # same ids (a tie within 1e-5 may swap two), values within the cache's quantisation
        lp = target.logprobs[rows].numpy()
        same = (item["teacher_ids"] == target.ids[rows].numpy()) | ~valid
        assert same.mean() > 0.99
        diff = np.where(valid & same, np.abs(item["teacher_logprobs"] - np.where(valid, lp, 0)), 0)
        assert diff.max() <= HALF_STEP + 1e-5
        stats = {"teacher_std": target.std, "teacher_entropy": target.entropy, "teacher_tail": target.tail,
                 "teacher_power_sum@0.5": target.power_sums[0.5]}  # fmt: skip
        for key, value in stats.items():
            np.testing.assert_allclose(item[key], value[rows].numpy(), rtol=1e-3, atol=3e-5, err_msg=key)


def test_in_step_teacher_targets_equal_cached_ones_and_train_through_the_cli(tmp_path, prepared, hf_teacher):

    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=8, n_val=4)
    main(predict_args(hf_teacher, tokens, tmp_path / "cache"))
    assert_in_step_equals_cache(hf_teacher, tokens, tmp_path / "cache")
    processor_args = ["--model.teacher_processor", "pd_lightning.distill.processors.TopPK",
                      "--model.teacher_processor.p", "0.95", "--model.teacher_processor.k", "20"]  # fmt: skip
    # Through the CLI: the student distils from the in-step teacher; the checkpoint holds no teacher weights and
    # the optimizer state covers the student's parameters only.
    root = tmp_path / "fit"
    main(in_step_args(tokens, root, 3, "--model.teacher", str(hf_teacher), *processor_args))
    import csv

    with open(root / "log" / "version_0" / "metrics.csv") as f:
        kd = [float(r["train/kd_loss"]) for r in csv.DictReader(f) if r.get("train/kd_loss")]
    assert len(kd) == 3 and all(math.isfinite(v) and v > 0 for v in kd)
    ckpt = torch.load(next(root.rglob("*.ckpt")), weights_only=True)
    assert all(k.startswith(("model.",)) for k in ckpt["state_dict"]), list(ckpt["state_dict"])[:5]
    n_params = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    assert n_params == len(ckpt["state_dict"])


def logged(root: Path, name: str) -> dict[int, float]:
    import csv

    with open(root / "log" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]) + 1: float(r[name]) for r in csv.DictReader(f) if r.get(name)}


def test_co_training_trains_both_and_resumes_exactly(tmp_path, prepared):
    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=12, n_val=4)  # 3 steps per epoch
    ckpt = [
        "--model.co_train.preset", "tiny",
        "--model.co_train.n_layer", "3",  # a teacher of another shape than the student
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=4",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(in_step_args(tokens, full, 8, *ckpt, "--trainer.callbacks.dirpath", str(full)))
    first = full / "step=4.ckpt"
    main([*in_step_args(tokens, resumed, 8, *ckpt, "--trainer.callbacks.dirpath", str(resumed)), "--ckpt_path",
          str(first)])  # fmt: skip
    # Both train: the teacher's LM loss and the student's KD loss are logged every step and the teacher learns.
    teacher_lm = logged(full, "train/teacher_lm_loss")
    assert len(teacher_lm) == 8 and teacher_lm[8] < teacher_lm[1] - 0.05, teacher_lm
    assert len(logged(full, "train/kd_loss")) == 8
    # Resume equals uninterrupted: the same losses for steps 5-8 and the same weights (student and teacher).
    for name in ("train/loss", "train/teacher_lm_loss", "train/kd_loss"):
        a, b = logged(full, name), logged(resumed, name)
        assert {s: a[s] for s in range(5, 9)} == {s: b[s] for s in range(5, 9)}, name
    a = torch.load(full / "step=8.ckpt", weights_only=True)
    b = torch.load(resumed / "step=8.ckpt", weights_only=True)
    assert any(k.startswith("teacher_model.") for k in a["state_dict"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    # The teacher trains: every one of its weight matrices moved between step 4 and step 8.
    c = torch.load(first, weights_only=True)["state_dict"]
    mats = [k for k in c if k.startswith("teacher_model.") and c[k].dim() == 2]
    assert mats and all(not torch.equal(c[k], a["state_dict"][k]) for k in mats)


def run(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("pd-lightning: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_bad_input_window_outside_the_run_and_a_folder_holding_another_cache(tmp_path, prepared, hf_teacher, capsys):
    from pd_lightning.cache.format import content_checksum

    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=8, n_val=4)
    outside = recorder_config(tmp_path / "r1.yaml", tmp_path / "rec1", start_step=4, end_step=20)
    code, err = run([*teacher_args(tokens, tmp_path / "t1", 6), "--config", str(outside)], capsys)
    assert code == 2 and "end_step=20" in one_line(err) and "[0, 6)" in one_line(err)
    assert not (tmp_path / "rec1").exists() and not list((tmp_path / "t1").rglob("*.ckpt"))
    too_many = recorder_config(tmp_path / "r2.yaml", tmp_path / "rec2", last_tokens=10**6)
    code, err = run([*teacher_args(tokens, tmp_path / "t2", 6), "--config", str(too_many)], capsys)
    assert code == 2 and "last_tokens=1000000" in one_line(err)
    # A teacher trained from a cache (no token-file sequence indices to record by): refused before the first step.
    main(predict_args(hf_teacher, tokens, tmp_path / "other"))
    from_cache = ["--data.class_path", "pd_lightning.cache.datamodule.CacheDataModule",
                  "--data.init_args.path", str(tmp_path / "other")]  # fmt: skip
    code, err = run([*teacher_args(tokens, tmp_path / "t4", 6), *from_cache, "--config", str(outside)], capsys)
    assert code == 2 and "TokenDataModule" in one_line(err) and not (tmp_path / "rec1").exists()
    # A folder holding another cache: refused before any step, the cache byte for byte unchanged.
    before = content_checksum(tmp_path / "other")
    names = sorted(p.name for p in (tmp_path / "other").iterdir())
    into_other = recorder_config(tmp_path / "r3.yaml", tmp_path / "other")
    code, err = run([*teacher_args(tokens, tmp_path / "t3", 6), "--config", str(into_other)], capsys)
    assert code == 2 and "already holds a teacher cache" in one_line(err) and "overwrite" in one_line(err)
    assert content_checksum(tmp_path / "other") == before
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == names
    assert not list((tmp_path / "t3").rglob("*.ckpt"))


def test_bad_input_in_step_teacher(tmp_path, prepared, hf_teacher, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=8, n_val=4)
    code, err = run(in_step_args(tokens, tmp_path / "a", 2, "--model.teacher", str(tmp_path / "missing.ckpt")), capsys)
    assert code == 2 and "missing.ckpt" in one_line(err) and "does not exist" in one_line(err)
    # Another vocabulary: a Llama of vocabulary 600 beside data of 512.
    other = tmp_path / "wide"
    LlamaForCausalLM(LlamaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)  # fmt: skip
    code, err = run(in_step_args(tokens, tmp_path / "b", 2, "--model.teacher", str(other)), capsys)
    assert code == 2 and "vocabulary 600" in one_line(err) and "512" in one_line(err)
    assert not list((tmp_path / "b").rglob("*.ckpt"))
    # Another tokenizer: a pd-lightning teacher checkpoint trained on data of another tokenizer.
    main(teacher_args(tokens, tmp_path / "t", 1))
    ckpt = torch.load(tmp_path / "t" / "step=1.ckpt", weights_only=True)
    ckpt["pd_lightning"]["tokenizer_fingerprint"] = "another-tokenizer"
    torch.save(ckpt, tmp_path / "other-tokenizer.ckpt")
    code, err = run(in_step_args(tokens, tmp_path / "c", 2, "--model.teacher", str(tmp_path / "other-tokenizer.ckpt")),
                    capsys)  # fmt: skip
    assert code == 2 and "another-tokenizer" in one_line(err) and "tokenizer" in one_line(err)
    assert not list((tmp_path / "c").rglob("*.ckpt"))


@pytest.mark.parametrize("kill_step", [5, 6])
def test_recorder_killed_mid_window_resumes_to_the_uninterrupted_cache(tmp_path, prepared, kill_step):
    """SIGKILL after step 5 of a 6-step window (before its checkpoint); resuming from the step-4 checkpoint drops the
    spool parts recorded after it and records those steps again: the cache equals the uninterrupted run's. Killed
    after step 6 (the recording finished, its checkpoint not saved), the resumed run keeps the finished cache."""
    import os
    import subprocess
    import sys

    from pd_lightning.cache.format import content_checksum

    root = Path(__file__).resolve().parents[1]
    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=8, n_val=4)
    every2 = ["--trainer.callbacks.every_n_train_steps=2"]
    whole = recorder_config(tmp_path / "a.yaml", tmp_path / "cache-a", start_step=0, end_step=6)
    main([*teacher_args(tokens, tmp_path / "a", 6), "--config", str(whole)])
    killed = recorder_config(tmp_path / "b.yaml", tmp_path / "cache-b", start_step=0, end_step=6)
    args = [*teacher_args(tokens, tmp_path / "b", 6), *every2, "--config", str(killed)]
    fault = [
        "--trainer.callbacks+=tests.faults.Fault",
        "--trainer.callbacks.at=train",
        f"--trainer.callbacks.step={kill_step}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pd_lightning.cli"]
    proc = subprocess.run([*cmd, *args, *fault], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    spool = tmp_path / "cache-b" / ".recording"
    if kill_step == 5:
        assert len(list(spool.glob("part-*.pt"))) >= 4 and not (tmp_path / "cache-b" / "index.json").exists()
    else:
        assert not spool.exists() and (tmp_path / "cache-b" / "index.json").exists()
    proc = subprocess.run([*cmd, *args, "--ckpt_path", str(tmp_path / "b" / "step=4.ckpt")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("not recording again" in proc.stdout) == (kill_step == 6)
    assert not spool.exists()
    assert content_checksum(tmp_path / "cache-b") == content_checksum(tmp_path / "cache-a")


@pytest.mark.parametrize("fused", [True, False])
def test_observe_hook_sees_every_row_once_with_the_training_logits_and_changes_nothing(fused):
    """``lm_kd_loss(observe=...)``: the chunks cover the N rows once, in order, and equal fp64 hidden @ W.T; the
    loss and the gradients are bit for bit those of the same call without the hook."""
    from pd_lightning.distill.objective import lm_kd_loss

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 50, (37,), generator=gen)
    labels[3] = -100
    seen = []

    def observe(rows, logits):
        seen.append((rows.start, logits.clone()))

    runs = []
    for hook in (None, observe):
        out = lm_kd_loss(hidden, weight, labels, None, 0.0, None, chunk_size=8, fused=fused, observe=hook)
        grads = torch.autograd.grad(out.total, (hidden, weight))
        runs.append((out.total.detach(), *grads))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert [s for s, _ in seen] == (list(range(0, 37, 8)) if fused else [0])
    full = torch.cat([x for _, x in seen])
    assert full.shape == (37, 50)
    torch.testing.assert_close(
        full.double(), hidden.detach().double() @ weight.detach().double().T, rtol=1e-5, atol=1e-5
    )


def test_in_step_pd_lightning_checkpoint_teacher_equals_its_predict_cache(tmp_path, prepared):
    """A pd-lightning .ckpt teacher (the chunked path: its (N, V) logits never exist) against `predict` with it."""
    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=8, n_val=4)
    main(teacher_args(tokens, tmp_path / "t", 2))
    main(predict_args(tmp_path / "t" / "step=2.ckpt", tokens, tmp_path / "cache"))
    assert_in_step_equals_cache(tmp_path / "t" / "step=2.ckpt", tokens, tmp_path / "cache")


def test_co_trained_teacher_target_is_its_current_logits_and_its_loss_its_lm_loss():
    """``_online_target`` under co-training: the target is TopPK of the teacher's current logits (fp64 reference) and
    the returned loss is the teacher's LM cross-entropy, with gradient into the teacher only."""
    from pd_lightning.distill.processors import TopPK
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.module import DistillationModule

    torch.manual_seed(0)
    module = DistillationModule(StudentConfig(preset="tiny", vocab_size=64), co_train=StudentConfig(preset="tiny"),
                                teacher_processor=TopPK(1.0, 4), loss_chunk_size=16)  # fmt: skip
    ids = torch.randint(0, 64, (2, 33))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "sequence_index": torch.arange(2)}
    target, out = module._online_target(batch, alpha=0.5)
    teacher = module.teacher_model
    with torch.no_grad():
        logp = torch.log_softmax(teacher.double()(batch["input_ids"]).reshape(-1, 64), -1)
    teacher.float()
    top, _ = logp.topk(4, -1)
    torch.testing.assert_close(target.logprobs.double(), top, rtol=0, atol=1e-5)
    torch.testing.assert_close(target.logprobs.double(), logp.gather(1, target.ids), rtol=0, atol=1e-5)
    lm = -logp.gather(1, batch["labels"].reshape(-1, 1)).mean()
    torch.testing.assert_close(out.total.double(), lm, rtol=1e-5, atol=1e-5)
    out.total.backward()
    assert all(p.grad is not None for p in teacher.parameters())
    assert all(p.grad is None for p in module.model.parameters())


def test_a_fresh_unrelated_teacher_run_does_not_adopt_a_finished_recording(tmp_path, prepared, capsys):
    """Item 4: a finished recording is this run's only when the run resumes from one of its checkpoints. Another
    teacher run (other seed and learning rate, same shape, window and data, not resumed) into the same output is
    refused in one line naming ``overwrite: true``, the cache byte for byte unchanged; the recording run resumed from
    a checkpoint older than its finish keeps it; with ``overwrite: true`` the other run records its own logits."""
    from pd_lightning.cache.format import content_checksum

    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=8, n_val=4)
    out = tmp_path / "cache"
    config = recorder_config(tmp_path / "r.yaml", out, start_step=0, end_step=2)
    main([*teacher_args(tokens, tmp_path / "a", 2), "--config", str(config)])
    before, order = content_checksum(out), np.load(out / "recorded_sequences.npy")
    other = [*teacher_args(tokens, tmp_path / "b", 2), "--seed_everything", "5", "--model.lr", "1e-3"]
    code, err = run([*other, "--config", str(config)], capsys)
    assert code == 2 and "overwrite: true" in one_line(err) and "already holds" in one_line(err), err[-2000:]
    assert content_checksum(out) == before and not list((tmp_path / "b").rglob("*.ckpt"))
    # The recording run itself, resumed from its step-1 checkpoint: its finished recording is kept.
    capsys.readouterr()
    main([*teacher_args(tokens, tmp_path / "a", 2), "--config", str(config),
          "--ckpt_path", str(tmp_path / "a" / "step=1.ckpt")])  # fmt: skip
    assert "already holds this run's finished recording" in capsys.readouterr().out
    assert content_checksum(out) == before
    # overwrite: true replaces it with the other run's recording.
    replace = recorder_config(tmp_path / "o.yaml", out, start_step=0, end_step=2, overwrite=True)
    code, err = run([*other, "--config", str(replace)], capsys)
    assert code == 0, err[-2000:]
    assert content_checksum(out) != before and np.load(out / "recorded_sequences.npy").tolist() == order.tolist()


def test_recorder_map_is_written_before_the_index_and_a_complete_cache_without_it_is_refused(
    tmp_path, prepared, capsys
):
    """Item 7: SIGKILL when ``recorded_sequences.npy`` is being written leaves no complete cache without its map; the
    resumed run ends with the uninterrupted run's cache and map. A complete cache without its map (what such a kill
    left before) is refused by the resumed run in one line naming ``overwrite: true``."""
    import os
    import subprocess
    import sys

    from pd_lightning.cache.format import content_checksum, read_layout

    root = Path(__file__).resolve().parents[1]
    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=8, n_val=4)
    whole = recorder_config(tmp_path / "a.yaml", tmp_path / "cache-a", start_step=0, end_step=6)
    main([*teacher_args(tokens, tmp_path / "a", 6), "--config", str(whole)])
    out = tmp_path / "cache-b"
    killed = recorder_config(tmp_path / "b.yaml", out, start_step=0, end_step=6)
    args = [*teacher_args(tokens, tmp_path / "b", 6), "--trainer.callbacks.every_n_train_steps=2", "--config",
            str(killed)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    worker = [sys.executable, str(root / "tests" / "workers" / "kill_at_map.py")]
    proc = subprocess.run([*worker, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    layout = read_layout(out, check_files=False) if out.is_dir() else None
    assert layout is None or not layout.complete, "a kill at the map left a complete cache without its map"
    resume = [*args, "--ckpt_path", str(tmp_path / "b" / "step=4.ckpt")]
    code, err = run(resume, capsys)
    assert code == 0, err[-2000:]
    assert np.load(out / "recorded_sequences.npy").tolist() == list(range(8))
    assert content_checksum(out) == content_checksum(tmp_path / "cache-a") and not (out / ".recording").exists()
    # A complete cache whose map is missing: refused, not adopted.
    (out / "recorded_sequences.npy").unlink()
    code, err = run(resume, capsys)
    assert code == 2 and "recorded_sequences.npy" in one_line(err) and "overwrite: true" in one_line(err), err[-2000:]
