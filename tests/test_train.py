"""Training through the CLI as a user runs it: falling loss, exact resume, refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from pd_lightning.cli import main


def quiet_trainer_args(root: Path, max_steps: int) -> list[str]:
    """CPU, one device, a CSV log of every step under ``root/log/version_0``."""
    return [
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.max_steps", str(max_steps),
        "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(root),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(root),
        "--trainer.logger.name", "log",
        "--trainer.logger.version", "0",
    ]  # fmt: skip


def tiny_fit_args(tokens: Path, root: Path, max_steps: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--seed_everything", "7",
        "--model.student.preset", "tiny",
        "--model.lr", "3e-3",
        "--data.class_path", "pd_lightning.corpus.datamodule.TokenDataModule",
        "--data.init_args.path", str(tokens),
        "--data.init_args.batch_size", "4",
        "--data.init_args.val_sequences", "8",
        *quiet_trainer_args(root, max_steps),
        *extra,
    ]  # fmt: skip


def train_losses(root: Path) -> dict[int, float]:
    """step (1-based: the loss of the step that produced global_step = step) -> logged train loss."""
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]) + 1: float(r["train/loss"]) for r in rows}


def val_losses(root: Path) -> list[float]:
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        return [float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")]


def test_lm_pretraining_loss_falls(tmp_path, prepared, capsys):
    main(tiny_fit_args(prepared["tokens"], tmp_path, 60, "--trainer.val_check_interval", "20"))
    vals = val_losses(tmp_path)
    # Below the uniform model's ln(512) = 6.24 and falling from the first validation to the last.
    assert len(vals) == 3 and vals[-1] < vals[0] - 0.02 and max(vals) < 6.24 - 0.5, vals
    out = capsys.readouterr().out
    assert "val/loss" in out  # ValidationReport prints one line per validation
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts
    # The checkpoint rebuilds the module (plug-ins included) from its saved hyperparameters.
    from pd_lightning.module import DistillationModule

    restored = DistillationModule.load_from_checkpoint(ckpts[0], map_location="cpu", weights_only=False)
    assert restored.student_config.n_layer == 2 and restored.student_config.vocab_size == 512
    # `pd-lightning validate` scores the checkpoint: the same validation loss as the last one of the run.
    args = tiny_fit_args(prepared["tokens"], tmp_path / "v", 60)
    args[0] = "validate"
    main([*args, "--ckpt_path", str(ckpts[0])])
    out = capsys.readouterr().out
    assert "val/loss" in out and f"{vals[-1]:.4f}"[:5] in out, out[-500:]


def small_token_file(prepared: dict, out: Path, n_train: int = 104, n_val: int = 16) -> Path:
    """The first ``n_train`` training and ``n_val`` validation sequences of the prepared token file, written as a
    single-file token file, so that a run of a few dozen steps crosses epoch boundaries without
    ``limit_train_batches``."""
    import h5py

    from pd_lightning.corpus.prepare import TokenFile

    src = TokenFile(prepared["tokens"])
    with h5py.File(out, "w") as dst:
        dst["train"] = src.rows("train", slice(0, n_train))
        dst["val"] = src.rows("val", slice(0, n_val))
        for key in ("tokenizer_fingerprint", "vocab_size", "seq_len", "eos_id", "complete"):
            dst.attrs[key] = src.attrs[key]
        dst.attrs["schema_version"] = 1
        dst.attrs["tokenizer_path"] = str(prepared["tokenizer"])
    return out


def epochs_by_step(root: Path) -> dict[int, int]:
    """step (1-based) -> epoch in which it ran, from the CSV log."""
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]) + 1: int(r["epoch"]) for r in csv.DictReader(f) if r.get("train/loss")}


CKPT = [
    "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
    "--trainer.callbacks.every_n_train_steps=6",
    "--trainer.callbacks.save_top_k=-1",
    "--trainer.callbacks.filename={step}",
    "--trainer.limit_val_batches=0",
]


@pytest.mark.parametrize("resume_step", [6, 24, 30])
def test_exact_resume(tmp_path, prepared, resume_step):
    """No ``limit_train_batches``: 104 sequences / batch 4 = 26 steps per epoch; resume in epoch 0 (step 6), at the
    end of epoch 0 (24) and in epoch 1 (30). Issue 8: a resume in epoch 0 used to end that epoch (and every later
    one) early, dropping data."""
    tokens = small_token_file(prepared, tmp_path / "tokens.h5")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(tiny_fit_args(tokens, full, 42, *CKPT))
    reference = train_losses(full)
    assert sorted(reference) == list(range(1, 43))
    epochs = epochs_by_step(full)
    assert [epochs[s] for s in (1, 26, 27, 42)] == [0, 0, 1, 1]  # an epoch is all 26 batches
    ckpt = next(full.rglob(f"step={resume_step}.ckpt"))
    main(tiny_fit_args(tokens, resumed, 42, *CKPT, "--ckpt_path", str(ckpt)))
    after = train_losses(resumed)
    assert sorted(after) == list(range(resume_step + 1, 43))  # no step repeated or skipped
    for step in after:
        assert after[step] == reference[step], (step, after[step], reference[step])
    assert epochs_by_step(resumed) == {s: e for s, e in epochs.items() if s > resume_step}  # epochs end alike
    # The final weights agree too.
    a = torch.load(next(full.rglob("step=42.ckpt")), weights_only=True)["state_dict"]
    b = torch.load(next(resumed.rglob("step=42.ckpt")), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampler_visits_each_sequence_once_per_epoch():
    from pd_lightning.corpus.sampler import ResumableSampler

    ranks = [ResumableSampler(23, True, 5, r, 3) for r in range(3)]
    seen = [i for s in ranks for i in s]
    assert len(seen) == len(set(seen)) == 21  # trimmed to a multiple of the world size, disjoint across ranks
    s = ResumableSampler(23, True, 5)
    full = list(s)
    s.resume(0, 10)
    assert list(s) == full[10:] and len(s) == 23  # the length stays the epoch's (Lightning counts restored batches)
    s.set_epoch(1)
    assert len(list(s)) == 23 and list(s) != full


def test_resume_with_other_shape_is_refused(tmp_path, prepared, capsys):
    main(tiny_fit_args(prepared["tokens"], tmp_path / "a", 6, *CKPT))
    ckpt = next((tmp_path / "a").rglob("step=6.ckpt"))
    with pytest.raises(SystemExit) as e:
        main(
            tiny_fit_args(
                prepared["tokens"], tmp_path / "b", 12, "--model.student.n_layer", "3", "--ckpt_path", str(ckpt)
            )
        )
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--ckpt_path" in err and "n_layer" in err


def test_unknown_preset_and_missing_data(tmp_path, prepared, capsys):
    with pytest.raises(SystemExit) as e:
        main(tiny_fit_args(prepared["tokens"], tmp_path, 3, "--model.student.preset", "13B"))
    assert e.value.code != 0
    assert "13B" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(tiny_fit_args(tmp_path / "nothing.h5", tmp_path, 3))
    assert e.value.code != 0
    assert "nothing.h5" in capsys.readouterr().err


def test_ddp_two_cpu_processes(tmp_path, prepared):
    """A real multi-process run (DDP, gloo): each rank reads its own half of the data; the run checkpoints."""
    import os
    import subprocess
    import sys

    args = tiny_fit_args(prepared["tokens"], tmp_path, 4, "--trainer.strategy", "ddp", "--trainer.devices", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "max_steps=4" in run.stderr + run.stdout
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["TokenDataModule"]["consumed"] == 4 * 4  # per rank: 4 batches of 4 sequences


@pytest.mark.parametrize("fused", [True, False])
def test_alpha_zero_module_equals_lm_only_module_bit_for_bit(fused):
    from pd_lightning.distill.losses import KLD
    from pd_lightning.distill.schedules import Constant
    from pd_lightning.distill.temperature import StaticTemperature
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.module import DistillationModule

    cfg = StudentConfig(preset="tiny", vocab_size=97)
    torch.manual_seed(0)
    lm = DistillationModule(cfg, fused_loss=fused, max_steps=10)
    torch.manual_seed(0)
    kd = DistillationModule(
        cfg, loss=KLD(), temperature=StaticTemperature(2.0), alpha=Constant(0.0), fused_loss=fused, max_steps=10
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 17), generator=g)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    teacher = {
        "teacher_ids": torch.randint(0, 97, (2, 16, 5), generator=g),
        "teacher_logprobs": torch.log_softmax(torch.randn(2, 16, 5, generator=g), -1) - 0.1,
    }
    a = lm._loss(batch, lm.alpha_at(0)).total
    b = kd._loss({**batch, **teacher}, kd.alpha_at(0)).total
    a.backward()
    b.backward()
    assert torch.equal(a, b)
    for (name, p), q in zip(lm.named_parameters(), kd.parameters()):
        assert torch.equal(p.grad, q.grad), name


def first_batch(args: list[str]) -> torch.Tensor:
    """The first training batch a `pd-lightning fit` with ``args`` would see (the CLI builds it, nothing runs)."""
    from pd_lightning.lightning_cli import train_cli

    cli = train_cli(args[1:], run=False)  # without the subcommand: parse, seed, instantiate
    return next(iter(cli.datamodule.train_dataloader()))["input_ids"]


def test_seed_everything_changes_the_data_order_unless_data_seed_is_set(tmp_path, prepared):
    """Issue 7: --seed_everything did not change the data order (that was --data.seed, default 1234)."""
    tokens = small_token_file(prepared, tmp_path / "tokens.h5")
    args = tiny_fit_args(tokens, tmp_path, 6)
    seed = args.index("--seed_everything") + 1  # the data seed: from --seed_everything unless --data.seed
    orders = {}
    for s in ("7", "8"):
        args[seed] = s
        orders[s] = first_batch(args)
        orders[s, "fixed"] = first_batch([*args, "--data.init_args.seed", "5"])
    assert not torch.equal(orders["7"], orders["8"])
    assert torch.equal(orders["7", "fixed"], orders["8", "fixed"])


def test_resume_keeps_the_data_order_whatever_seed_everything(tmp_path, prepared):
    tokens = small_token_file(prepared, tmp_path / "tokens.h5")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    main(tiny_fit_args(tokens, full, 12, *CKPT))
    ckpt = next(full.rglob("step=6.ckpt"))
    args = tiny_fit_args(tokens, resumed, 12, *CKPT, "--ckpt_path", str(ckpt))
    args[args.index("--seed_everything") + 1] = "99"
    main(args)
    reference, after = train_losses(full), train_losses(resumed)
    assert sorted(after) == list(range(7, 13)) and all(after[s] == reference[s] for s in after)


def test_fit_refuses_missing_validation_data(tmp_path, prepared, capsys):
    """Issue 7: fit with validation configured and no validation sequences ran without ever validating."""
    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_val=0)
    with pytest.raises(SystemExit) as e:
        main(tiny_fit_args(tokens, tmp_path / "a", 2))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("pd-lightning: error: fit: validation is configured"), err
    assert "tokens.h5" in err[-1] and "--val_fraction" in err[-1] and "--trainer.limit_val_batches 0" in err[-1]
    assert not list((tmp_path / "a").rglob("*.ckpt"))
    main(tiny_fit_args(tokens, tmp_path / "b", 2, "--trainer.limit_val_batches", "0"))  # the way out it names
    assert list((tmp_path / "b").rglob("*.ckpt"))
    with pytest.raises(SystemExit) as e:
        main(tiny_fit_args(prepared["tokens"], tmp_path / "c", 2, "--data.init_args.val_sequences", "0"))
    assert e.value.code == 2 and "--data.val_sequences is 0" in capsys.readouterr().err


def test_quiet_lightning_drops_only_the_tips():
    """Lightning's "💡 Tip" advertising lines are dropped from fit/predict output; its other notices are kept."""
    import logging

    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    from pd_lightning.lightning_cli import quiet_lightning

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger("lightning.pytorch")
    handler, level = Keep(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        quiet_lightning()
        quiet_lightning()  # idempotent
        rank_zero_info("💡 Tip: try installing litlogger")
        rank_zero_info("Restored all states from the checkpoint")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert "Restored all states from the checkpoint" in seen and "💡 Tip: try installing litlogger" not in seen


def test_checkpoint_folder_warning_only_for_a_folder_used_before(tmp_path, prepared, recwarn):
    """Checkpoints in the folder of the run's own logs (as the demo teacher has them): no "exists and is not empty"
    on the first run (only its own config.yaml was there); a second fit into the same, now full, folder still
    gets Lightning's warning (the first run's silencing ended with it)."""
    folder = tmp_path / "teacher"
    ckpt = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath", str(folder)]
    for run, warned in ((1, False), (2, True)):
        recwarn.clear()
        main(tiny_fit_args(prepared["tokens"], folder, 2, *ckpt))
        said = [str(w.message) for w in recwarn]
        assert (f"Checkpoint directory {folder} exists and is not empty." in said) is warned, (run, said)
        assert list(folder.glob("*.ckpt")) and (folder / "log" / "version_0" / "metrics.csv").exists()


def test_fit_moved_elsewhere_refuses_to_overwrite_the_config_folders_checkpoints(tmp_path, prepared, capsys):
    """A config that names its checkpoint folder (the demo teacher's): a second fit moved with only
    ``--trainer.default_root_dir`` is refused in one line naming the flag, before it writes anything; the first run's
    checkpoint is untouched; with the dirpath flag too it runs."""
    first, second = tmp_path / "teacher", tmp_path / "short"
    main(tiny_fit_args(prepared["tokens"], first, 2, "--trainer.callbacks+=ModelCheckpoint",
                       "--trainer.callbacks.dirpath", str(first)))  # fmt: skip
    (ckpt,) = first.glob("*.ckpt")
    before = ckpt.read_bytes()
    capsys.readouterr()
    moved = tiny_fit_args(prepared["tokens"], second, 2, "--trainer.callbacks+=ModelCheckpoint",
                          "--trainer.callbacks.dirpath", str(first))  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(moved)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"pd-lightning: error: fit: the checkpoint folder {first} "), err
    assert ckpt.name in err[-1] and f"--trainer.callbacks.init_args.dirpath {second}" in err[-1]
    assert ckpt.read_bytes() == before and not second.exists()
    main(moved[:-1] + [str(second)])  # the way out it names
    assert list(second.glob("*.ckpt")) and ckpt.read_bytes() == before
