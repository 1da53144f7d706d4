"""`pd-lightning predict` end to end with a tiny local HF teacher: SIGKILL + resume, cache-info, refusals,
and distillation from the resulting cache through `pd-lightning fit`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pd_lightning.cache.format import content_checksum
from pd_lightning.cli import main
from tests.test_train import quiet_trainer_args, tiny_fit_args

ROOT = Path(__file__).resolve().parents[1]


def predict_args(teacher: Path, tokens: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--model.teacher", str(teacher),
        "--model.processor", "pd_lightning.distill.processors.TopPK",
        "--model.processor.p", "0.95",
        "--model.processor.k", "20",
        "--data.path", str(tokens),
        "--data.split", "val",
        "--data.batch_size", "4",
        "--writer.output", str(out),
        "--writer.shard_tokens", "2048",  # 32 sequences of 64 positions per shard: 15 shards
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.h5"))


def val_shards(prepared) -> tuple[int, int]:
    """Validation sequences of the prepared token file and the shards (32 sequences each) a cache of them has."""
    from pd_lightning.corpus.prepare import TokenFile

    n = TokenFile(str(prepared["tokens"]), flag="--data.path").lengths["val"]
    return n, -(-n // 32)


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pd_lightning.cli", *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True)


@pytest.fixture(scope="module")
def reference_cache(tmp_path_factory, hf_teacher, prepared) -> Path:
    out = tmp_path_factory.mktemp("ref") / "cache"
    main(predict_args(hf_teacher, prepared["tokens"], out))
    return out


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, hf_teacher, prepared, reference_cache):
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "pd_lightning.cli", *predict_args(hf_teacher, prepared["tokens"], out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(shard_files(out)) < 2 and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "predict finished before it could be killed; make the job longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "index.json").exists(), "a killed run must not look finished"
    # The half-written cache is refused by readers, naming the remedy.
    from pd_lightning.cache.reader import TeacherCache

    with pytest.raises(Exception, match="predict"):
        TeacherCache(out)
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    assert content_checksum(out) == content_checksum(reference_cache)


def test_rerun_after_kill_past_the_last_shard_finishes_the_cache(tmp_path, hf_teacher, prepared, reference_cache):
    """Issue 8 item 2: killed after the last shard but before the final index, a rerun has nothing to predict
    (Lightning skips the loop) and must still finish the cache."""
    out = tmp_path / "cache"
    _, shards = val_shards(prepared)
    kill = f"after_index:{shards}"
    killed = run_cli(predict_args(hf_teacher, prepared["tokens"], out), PD_LIGHTNING_TEST_KILL_AT=kill)
    assert killed.returncode == -signal.SIGKILL and len(shard_files(out)) == shards
    assert not (out / "index.json").exists()
    rerun = run_cli(predict_args(hf_teacher, prepared["tokens"], out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert (out / "index.json").exists() and not list(out.glob("index-*.json"))
    assert content_checksum(out) == content_checksum(reference_cache)


def test_two_writer_ranks_then_one_and_two_reader_ranks(tmp_path, hf_teacher, prepared, reference_cache):
    """Issue 7 item 1: `predict` on 2 DDP processes (gloo) completes the cache (before the fix Lightning's
    distributed sampler made each rank skip half of its own sequences), with the same content as 1 rank; the
    cache is then read by 1 and by 2 reader ranks, every sequence once."""
    from types import SimpleNamespace

    from pd_lightning.cache.datamodule import CacheDataModule
    from pd_lightning.corpus.prepare import TokenFile

    out = tmp_path / "cache"
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    run = run_cli(predict_args(hf_teacher, prepared["tokens"], out, *ddp))
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    n, shards = val_shards(prepared)
    assert (out / "index.json").exists() and len(shard_files(out)) == shards
    assert content_checksum(out) == content_checksum(reference_cache)  # independent of the writer count
    tokens = TokenFile(str(prepared["tokens"]), flag="--data.path")
    rows = {tuple(tokens.rows("val", i)[:-1].tolist()): i for i in range(n)}
    for readers in (1, 2):
        seen: list[int] = []
        for rank in range(readers):
            dm = CacheDataModule(path=str(out), batch_size=5, shuffle=True, num_workers=0)
            dm.trainer = SimpleNamespace(global_rank=rank, world_size=readers)
            for batch in dm.train_dataloader():
                seen += [rows[tuple(r.tolist())] for r in batch["input_ids"]]
        # every sequence at most once; all of them but the sampler's trim to equal per-rank batches
        assert len(seen) == len(set(seen)) and len(seen) >= n - readers * 5, (readers, len(seen))


def test_cache_info_json(reference_cache, prepared, capsys):
    main(["cache-info", str(reference_cache), "--json", "true"])
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("tokens", "bytes_per_token", "bytes_per_entry", "mean_entries_per_token", "mean_kept_mass"):
        assert isinstance(info[key], int | float), key
    n, shards = val_shards(prepared)
    assert info["schema_version"] == 3 and info["tokens"] == n * 64 and info["complete"] is True  # predict's default
    assert info["shards"] == info["num_shards"] == shards and info["power_gammas"] == [0.5]
    assert 1 <= info["mean_entries_per_token"] <= 20
    # schema 3 codes the same quantised values as schema 2's 4 B packed entries, in fewer bytes even on a tiny cache
    # (the teacher's real distributions; the per-shard id table and per-block headers included)
    assert info["bytes_per_entry"] < 4.0
    assert info["max_abs_logprob_error_bound"] == pytest.approx(math.log(1e6) / (2**14 - 1) / 2)


def test_rerun_of_complete_cache_and_other_parameters(reference_cache, hf_teacher, prepared, capsys, recwarn):
    index = reference_cache / "index.json"
    before = (index.read_bytes(), index.stat().st_mtime_ns)
    main(predict_args(hf_teacher, prepared["tokens"], reference_cache))
    out = capsys.readouterr().out
    assert "already complete; nothing to do" in out and "wrote" not in out  # and index.json is left as it was
    assert (index.read_bytes(), index.stat().st_mtime_ns) == before
    said = [str(w.message) for w in recwarn]  # no Lightning warning about the empty loop, nor about a missing seed
    assert not [m for m in said if "DataLoader" in m or "No seed found" in m], said
    with pytest.raises(SystemExit) as e:
        main(predict_args(hf_teacher, prepared["tokens"], reference_cache, "--model.processor.k", "5"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pd-lightning: error:")]
    assert len(lines) == 1 and "--writer.overwrite true" in lines[0] and "overwrite=True" not in err
    assert "Traceback" not in err


def test_teacher_refusals(tmp_path, hf_teacher, prepared, capsys):
    def fails(args, *needles):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, err

    out = tmp_path / "c"
    fails(predict_args(tmp_path / "nope", prepared["tokens"], out), "--model.teacher", "nope")
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8, "num_layers": 1, "num_heads": 1}))
    fails(predict_args(t5, prepared["tokens"], out), "not a causal language model")
    # (A token file from another tokenizer than the teacher's is no longer refused: the teacher reads its text with
    # its own tokenizer, tests/test_crosstok_predict.py.)
    # NaN in the teacher's logits: the error names the sequence and position.
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "nan-teacher"
    model = AutoModelForCausalLM.from_pretrained(str(hf_teacher))
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    model.save_pretrained(str(bad))
    for f in hf_teacher.glob("*token*"):
        (bad / f.name).write_bytes(f.read_bytes())
    fails(predict_args(bad, prepared["tokens"], out), "NaN", "sequence 0, position 0")
    assert not shard_files(out)


def fit_from_cache(cache: Path, tokens: Path, root: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--seed_everything", "3",
        "--model.student.preset", "tiny",
        "--model.loss", "pd_lightning.distill.losses.KLD",
        "--model.temperature", "pd_lightning.distill.temperature.StaticTemperature",
        "--model.temperature.tau", "2.0",
        "--model.alpha", "pd_lightning.distill.schedules.Constant",
        "--model.alpha.alpha", "0.9",
        "--data.class_path", "pd_lightning.cache.datamodule.CacheDataModule",
        "--data.init_args.path", str(cache),
        "--data.init_args.val_tokens", str(tokens),
        "--data.init_args.batch_size", "4",
        "--data.init_args.val_sequences", "8",
        *quiet_trainer_args(root, max_steps),
        *extra,
    ]  # fmt: skip


def test_distil_from_cache_logs_kd_and_resumes_exactly(tmp_path, reference_cache, prepared):
    import csv

    ckpt = [
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=4",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
        "--trainer.limit_val_batches=0",
        "--data.init_args.num_workers=1",
    ]
    main(fit_from_cache(reference_cache, prepared["tokens"], tmp_path / "a", 8, *ckpt))
    main(fit_from_cache(reference_cache, prepared["tokens"], tmp_path / "b", 8, *ckpt,
                        "--ckpt_path", str(next((tmp_path / "a").rglob("step=4.ckpt")))))  # fmt: skip

    def rows(root):
        with open(next(root.rglob("metrics.csv"))) as f:
            return {int(r["step"]): r for r in csv.DictReader(f) if r.get("train/loss")}

    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert sorted(b) == [4, 5, 6, 7]
    for step, r in a.items():
        assert float(r["train/alpha"]) == pytest.approx(0.9)
        total, lm, kd = (float(r[k]) for k in ("train/loss", "train/lm_loss", "train/kd_loss"))
        assert total == pytest.approx(0.1 * lm + 0.9 * kd, rel=1e-5)
        assert float(r["train/mean_temperature"]) == pytest.approx(2.0)
        if step in b:
            assert b[step]["train/loss"] == r["train/loss"]


def test_kd_without_teacher_targets_is_refused(tmp_path, prepared, capsys):
    kd = ["--model.loss", "pd_lightning.distill.losses.KLD", "--model.alpha", "pd_lightning.distill.schedules.Constant"]
    args = tiny_fit_args(prepared["tokens"], tmp_path, 3, *kd, "--model.alpha.alpha", "0.5")
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "--model.alpha" in capsys.readouterr().err


def test_cache_info_plot(reference_cache, tmp_path, capsys):
    png = tmp_path / "hist.png"
    main(["cache-info", str(reference_cache), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean_entries_per_token" in capsys.readouterr().out


def test_cache_datamodule_refuses_other_tokenizer(tmp_path, reference_cache, corpus_dir):
    from pd_lightning.cache.datamodule import CacheDataModule
    from pd_lightning.cache.format import CacheMismatchError
    from pd_lightning.corpus.prepare import prepare

    other = tmp_path / "other" / "tokens.h5"
    prepare(input=[str(corpus_dir / "a.txt")], output=str(other), seq_len=16, vocab_size=300)
    with pytest.raises(CacheMismatchError) as e:
        CacheDataModule(path=str(reference_cache), val_tokens=str(other))
    ours = CacheDataModule(path=str(reference_cache)).tokenizer_fingerprint
    assert ours in str(e.value) and "--data.val_tokens" in str(e.value)


@pytest.mark.parametrize("damage", ["flipped_byte", "nan_std"])
def test_damaged_cache_in_fit_with_workers_is_one_line(tmp_path, reference_cache, prepared, damage):
    """Issue 8 items 3 and 6: `fit` over a damaged cache with --data.num_workers 1 fails with one line naming the
    shard (before: a 41-line worker traceback; a NaN std trained NaN weights)."""
    import shutil

    import h5py
    import numpy as np

    cache = tmp_path / "cache"
    shutil.copytree(reference_cache, cache)
    shard = cache / "shard-000000.h5"
    with h5py.File(shard, "r+") as f:
        if damage == "nan_std":
            f["std"][:] = np.nan
        else:
            offset = f["blocks"].id.get_chunk_info(0).byte_offset  # the coded entry blocks (schema 3)
    if damage == "flipped_byte":
        with open(shard, "r+b") as fh:
            fh.seek(offset + 5)
            byte = fh.read(1)
            fh.seek(offset + 5)
            fh.write(bytes([byte[0] ^ 0x40]))
    args = fit_from_cache(cache, prepared["tokens"], tmp_path / "run", 4, "--data.init_args.num_workers=1",
                          "--data.init_args.shuffle=false", "--trainer.limit_val_batches=0")  # fmt: skip
    run = run_cli(args)
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("pd-lightning: error:")]
    assert len(lines) == 1 and "shard-000000.h5" in lines[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert ("non-finite" in lines[0]) == (damage == "nan_std")
    assert not list((tmp_path / "run").rglob("*.ckpt"))
