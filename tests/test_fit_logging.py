"""What `pd-lightning fit` logs: perplexities as exp(token-weighted mean loss), throughput per optimizer step
without validation and checkpoint time (Lightning's Throughput names), the config that is used."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from pd_lightning.cli import main
from tests.test_train import small_token_file, tiny_fit_args


@pytest.fixture(scope="module")
def tokens(prepared, tmp_path_factory) -> Path:
    return small_token_file(prepared, tmp_path_factory.mktemp("logging") / "tokens.h5", n_train=104, n_val=10)


def rows(root: Path) -> list[dict]:
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def column(root: Path, key: str) -> dict[int, float]:
    """step (1-based) -> value of ``key`` where logged."""
    return {int(r["step"]) + 1: float(r[key]) for r in rows(root) if r.get(key)}


def test_val_ppl_is_exp_of_token_weighted_mean_loss(tokens, tmp_path):
    """10 validation sequences in batches of 4, 4, 2: val/loss and val/ppl against an fp64 recomputation."""
    from pd_lightning.module import DistillationModule

    main(
        tiny_fit_args(
            tokens,
            tmp_path,
            6,
            "--data.init_args.val_sequences=10",
            "--trainer.val_check_interval=6",
            "--trainer.check_val_every_n_epoch=null",
        )
    )
    val_loss, val_ppl = column(tmp_path, "val/loss"), column(tmp_path, "val/ppl")
    ckpt = next(tmp_path.rglob("*.ckpt"))
    module = DistillationModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).double().eval()
    from pd_lightning.corpus.prepare import TokenFile

    data = torch.from_numpy(TokenFile(tokens).rows("val", slice(0, 10)).astype("int64"))
    with torch.no_grad():
        logits = module(data[:, :-1])  # (10, 64, V) fp64
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten(), reduction="sum")
    mean = float(nll) / data[:, 1:].numel()
    assert list(val_loss) == [6] and val_loss[6] == pytest.approx(mean, rel=1e-5)
    assert val_ppl[6] == pytest.approx(math.exp(mean), rel=1e-5)


def test_train_ppl_is_exp_of_mean_loss_over_the_logging_window(tokens, tmp_path):
    every = tmp_path / "every"
    main(tiny_fit_args(tokens, every, 10))  # logs every step
    lm = column(every, "train/lm_loss")
    assert sorted(lm) == list(range(1, 11))
    windowed = tmp_path / "windowed"
    main(tiny_fit_args(tokens, windowed, 10, "--trainer.log_every_n_steps", "5"))
    ppl = column(windowed, "train/ppl")
    assert sorted(ppl) == [5, 10]
    for end in (5, 10):  # steps of equal token counts: the token-weighted mean is the plain mean
        reference = math.exp(sum(lm[s] for s in range(end - 4, end + 1)) / 5)
        assert ppl[end] == pytest.approx(reference, rel=1e-5), (end, ppl[end], reference)


def test_tokens_per_s_leaves_out_validation_and_checkpoints(tokens, tmp_path):
    """Validation runs and checkpoint saves that each take 1.5 s more: no step's implied time includes them."""
    main(
        tiny_fit_args(
            tokens,
            tmp_path,
            12,
            "--trainer.val_check_interval=4",
            "--trainer.check_val_every_n_epoch=null",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=3",
            "--trainer.callbacks+=tests.faults.Slow",
            "--trainer.callbacks.validation=1.5",
            "--trainer.callbacks.checkpoint=1.5",
        )
    )
    rate = column(tmp_path, "train/tokens_per_s")
    assert sorted(rate) == list(range(1, 13))  # one figure per optimizer step
    step_seconds = {s: 4 * 64 / r for s, r in rate.items()}  # 4 sequences of 64 tokens per step
    assert max(step_seconds.values()) < 1.0, step_seconds
    # Lightning's Throughput figures, under ThroughputMonitor's names (one rank: the per-device ones), once its
    # window of 10 steps is full.
    items = column(tmp_path, "train/device/items_per_sec")
    samples = column(tmp_path, "train/device/samples_per_sec")
    assert sorted(items) == sorted(samples) == [10, 11, 12]
    assert all(items[s] == pytest.approx(64 * samples[s]) for s in items)
    assert all(4 * 64 / items[s] < 1.0 for s in items)


def test_tokens_per_s_counts_every_micro_batch_of_a_step(tokens, tmp_path):
    """Gradient accumulation 2: the step's rate covers both micro-batches; the first one sleeps 1 s inside the step,
    so each step takes >= 1 s for 2 x 4 x 64 tokens."""
    main(
        tiny_fit_args(
            tokens,
            tmp_path,
            3,
            "--trainer.accumulate_grad_batches=2",
            "--trainer.limit_val_batches=0",
            "--trainer.callbacks+=tests.faults.Slow",
            "--trainer.callbacks.first_micro_batch=1.0",
        )
    )
    rate = column(tmp_path, "train/tokens_per_s")
    assert sorted(rate) == [1, 2, 3]
    for step, r in rate.items():
        assert 1.0 <= 2 * 4 * 64 / r < 3.0, (step, r)


def test_linked_wsd_alpha_is_saved_and_logged_as_used(tokens, tmp_path):
    """WSD-LR (0.05, 0.2) + WSD alpha (its own defaults 0.01, 0.1): alpha uses the LR's phase edges, and config.yaml,
    the logger's hparams.yaml and the checkpoint's hyperparameters all say so (issue 7: they showed 0.01, 0.1)."""
    import yaml

    main(
        tiny_fit_args(
            tokens,
            tmp_path,
            2,
            "--model.lr_schedule=pd_lightning.distill.lr.WSDLR",
            "--model.lr_schedule.warmup_fraction=0.05",
            "--model.lr_schedule.decay_fraction=0.2",
            "--model.alpha=pd_lightning.distill.schedules.WSD",
            "--model.alpha.alpha_max=0.0",  # LM data: alpha stays 0, the schedule's edges are what is checked
        )
    )
    config = yaml.safe_load((tmp_path / "log" / "version_0" / "config.yaml").read_text())["model"]["alpha"]
    hparams = yaml.safe_load((tmp_path / "log" / "version_0" / "hparams.yaml").read_text())["alpha"]
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)["hyper_parameters"]["alpha"]
    for saved in (config, hparams, ckpt):
        args = saved["init_args"]
        assert (args["warmup_fraction"], args["decay_fraction"]) == (0.05, 0.2), saved


class OtherWarning(L.Callback):
    """Emits, at the start of training, a warning that mentions a dataloader that is "not resumable" but is not
    Lightning's message: the filter for that message must leave it alone."""

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn
        from lightning.pytorch.utilities.warnings import PossibleUserWarning

        rank_zero_warn("pd-lightning test: some other dataloader is not resumable", category=PossibleUserWarning)


def test_resume_mid_epoch_has_no_dataloader_not_resumable_warning(tokens, tmp_path, recwarn):
    """Issue 16: resuming mid-epoch printed Lightning's "your dataloader is not resumable" warning, although the data
    module's sampler resumes exactly (tests/test_train.py::test_exact_resume). Exactly that message is silenced."""
    ckpt = [
        "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
    ]
    main(tiny_fit_args(tokens, tmp_path / "a", 3, *ckpt))
    step3 = next((tmp_path / "a").rglob("step=3.ckpt"))  # 26 steps per epoch: mid-epoch
    recwarn.clear()
    main(
        tiny_fit_args(
            tokens,
            tmp_path / "b",
            6,
            *ckpt,
            "--trainer.callbacks+=tests.test_fit_logging.OtherWarning",
            "--ckpt_path",
            str(step3),
        )
    )
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "your dataloader is not resumable" in m], messages
    assert "pd-lightning test: some other dataloader is not resumable" in messages, messages
    assert sorted(column(tmp_path / "b", "train/loss")) == [4, 5, 6]
