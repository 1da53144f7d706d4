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
    rec.update(output=str(output), last_tokens=None, **init_args)
    path.write_text(yaml.safe_dump(cfg))
    return path


def teacher_args(tokens: Path, root: Path, steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--seed_everything", "3",
        "--model.student.preset", "tiny",
        "--model.lr", "3e-3",
        "--model.loss_chunk_size", "40",  # several chunks per batch: the recorder sees the loss chunk by chunk
        "--data.class_path", "pd_lightning.data.datamodule.TokenDataModule",
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
    from pd_lightning.data.cache_reader import TeacherCache

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
        "--data.class_path", "pd_lightning.data.cache_datamodule.CacheDataModule",
        "--data.init_args.path", str(tmp_path / "cache"), "--data.init_args.batch_size", "4",
        *quiet_trainer_args(student, 4), "--trainer.limit_val_batches", "0",
    ])  # fmt: skip
    losses = train_losses(student)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses.values())
