"""Scale out (issue 11): 2-process DDP and FSDP2 fits (gloo, CPU) against a 1-process run, exact resume from their
(sharded) checkpoints, and the fused LM+KD loss with a sharded output head against one process.

Every multi-process run is a subprocess with ``OMP_NUM_THREADS=1`` (``pd-lightning fit`` or ``torchrun``).

Why the 1-process run is the reference: rank ``r`` of 2 takes every 2nd sequence of the shuffled order
(``ResumableSampler``), so 2 ranks with batch 4 see, at every step, the same 8 sequences as 1 process with batch 8;
every position of the cache is labelled and has a teacher target, so the mean of the two ranks' mean losses (what
DDP / FSDP average gradients over) is the 1-process mean, and the weights, hence the validation losses, agree up to
float32 summation order.
"""

from __future__ import annotations

import csv
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pd_lightning.cli import main
from tests.test_predict import fit_from_cache, predict_args

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
# 2 ranks vs 1 process: same data and initial weights, float32 sums in another order (all-reduce / reduce-scatter).
# Measured here (DDP and FSDP2 alike): |rel diff| <= 8e-8 on val/loss after 2, 4, 6 AdamW steps.
REL_TOL = 1e-5
TIMEOUT = 600  # seconds per subprocess: a collective that one rank never joins fails the test instead of hanging


def env1() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run_fit(args: list[str]) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, "-m", "pd_lightning.cli", *args],
        env=env1(),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=TIMEOUT,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return run


@pytest.fixture(scope="module")
def cache(tmp_path_factory, hf_teacher, prepared) -> Path:
    out = tmp_path_factory.mktemp("dist") / "cache"
    main(predict_args(hf_teacher, prepared["tokens"], out))
    return out


def metrics(root: Path) -> tuple[dict[int, str], dict[int, float]]:
    """(step -> logged train/loss as written, 1-based step -> val/loss) of a run's CSV log."""
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = {int(r["step"]) + 1: r["train/loss"] for r in rows if r.get("train/loss")}
    val = {int(r["step"]) + 1: float(r["val/loss"]) for r in rows if r.get("val/loss")}
    return train, val


def fit(cache: Path, prepared, root: Path, batch: int, *extra: str) -> list[str]:
    return fit_from_cache(
        cache, prepared["tokens"], root, STEPS,
        "--data.init_args.batch_size", str(batch),
        "--trainer.val_check_interval", "2",
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=3",
        "--trainer.callbacks.save_top_k=-1",
        "--trainer.callbacks.filename={step}",
        *extra,
    )  # fmt: skip


def val_bpb(root: Path) -> dict[int, float]:
    """1-based step -> val/bpb (bits per byte: nats and bytes summed over the ranks, then divided)."""
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]) + 1: float(r["val/bpb"]) for r in csv.DictReader(f) if r.get("val/bpb")}


@pytest.fixture(scope="module")
def one_process_root(cache, prepared, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one")
    main(fit(cache, prepared, root, 8))
    return root


@pytest.fixture(scope="module")
def one_process(one_process_root) -> dict[int, float]:
    train, val = metrics(one_process_root)
    assert sorted(train) == list(range(1, STEPS + 1)) and sorted(val) == [2, 4, 6]
    return val


STRATEGIES = {
    "ddp": ["--trainer.strategy", "ddp"],
    "fsdp2": ["--config", str(ROOT / "configs/trainer/fsdp2.yaml"), "--trainer.accelerator", "cpu"],
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_two_process_fit_matches_one_process_and_resumes_exactly(
    strategy, cache, prepared, one_process, one_process_root, tmp_path
):
    """2 ranks (gloo) match 1 process's validation losses and bits per byte within ``REL_TOL``; a resume from the
    step-3 checkpoint (a folder of shards under FSDP2) logs the uninterrupted run's train losses digit for digit."""
    flags = [*STRATEGIES[strategy], "--trainer.devices", "2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_fit(fit(cache, prepared, full, 4, *flags))
    train, val = metrics(full)
    assert sorted(train) == list(range(1, STEPS + 1))
    for step, loss in one_process.items():
        assert val[step] == pytest.approx(loss, rel=REL_TOL), (strategy, step, val[step], loss)
    bpb_one, bpb_two = val_bpb(one_process_root), val_bpb(full)
    assert sorted(bpb_two) == sorted(bpb_one) == [2, 4, 6]
    for step, bpb in bpb_one.items():
        assert bpb_two[step] == pytest.approx(bpb, rel=REL_TOL), (strategy, step, bpb_two[step], bpb)
    ckpt = next(full.rglob("step=3.ckpt"))
    if strategy == "fsdp2":  # a distributed checkpoint: one file of shards per rank + metadata
        assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2
    run_fit(fit(cache, prepared, resumed, 4, *flags, "--ckpt_path", str(ckpt)))
    after, val_after = metrics(resumed)
    assert sorted(after) == [4, 5, 6]  # no step repeated or skipped
    assert {s: after[s] for s in after} == {s: train[s] for s in after}
    assert val_after == {s: v for s, v in val.items() if s > 3}


def test_sharded_head_loss_and_gradients_match_one_process(tmp_path):
    """``lm_kd_loss`` with the head as a ``Shard(0)`` DTensor on 2 ranks (half the positions each) equals one process
    on all positions with the full head: the mean loss, the head gradient (reduce-scattered, then gathered) and
    ``d hidden`` (each rank's, times 1/2: the global mean's), in fp64; fused (chunks of 5 positions) and unfused.
    Before ``objective.full_head`` a DTensor head failed in both paths (DTensor and plain tensors mixed in matmuls).
    """
    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*cmd, str(ROOT / "tests/workers/sharded_head.py"), str(out)],
        env=env1(), capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    results = torch.load(out, weights_only=True)
    assert sorted(results) == ["fused", "unfused"]
    for r in results.values():
        assert r["grad_is_sharded"]
        torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=1e-12, atol=0)
        torch.testing.assert_close(r["d_weight"], r["ref_d_weight"], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(r["d_hidden"] / r["world"], r["ref_d_hidden"], rtol=1e-10, atol=1e-14)
        assert r["ref_d_weight"].abs().max() > 1e-3  # the comparison is not between zeros


def test_fsdp_yaml_builds_the_strategy_and_cpu_is_refused_in_one_line(prepared, tmp_path, monkeypatch, capsys):
    """``configs/trainer/fsdp.yaml`` (GPU only) as far as a CPU machine gets: Lightning's FSDPStrategy is built with one
    wrap unit per ``Block``, sharded checkpoints and the activation-checkpointing option; the trainer then refuses
    the CPU accelerator, which ``pd-lightning fit`` reports in one line (exit 2)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from pd_lightning.model.transformer import Block

    built = []
    init = FSDPStrategy.__init__

    @functools.wraps(init)  # keeps the signature jsonargparse reads
    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(FSDPStrategy, "__init__", recording_init)
    args = [
        "fit", "--config", str(ROOT / "configs/trainer/fsdp.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.strategy.init_args.activation_checkpointing_policy", "[pd_lightning.model.transformer.Block]",
        "--model.student.preset", "tiny", "--data.init_args.path", str(prepared["tokens"]),
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pd-lightning: error:") and "GPU" in err[-1], err[-3:]
    (strategy,) = built
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == {Block}
    assert strategy._state_dict_type == "sharded"
    assert set(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes) == {Block}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_bf16_steps_and_sharded_resume_on_gpu(cache, prepared, tmp_path):
    """``configs/trainer/fsdp.yaml`` on up to 2 GPUs: bf16 steps from a cache with KD, a sharded checkpoint folder,
    and a resume from it that logs the uninterrupted run's train losses (within 1e-3: GPU kernels may reduce in
    another order)."""
    devices = min(2, torch.cuda.device_count())
    flags = ["--config", str(ROOT / "configs/trainer/fsdp.yaml"), "--trainer.accelerator", "gpu"]
    flags += ["--trainer.devices", str(devices)]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_fit(fit(cache, prepared, full, 4, *flags))
    train, _ = metrics(full)
    assert sorted(train) == list(range(1, STEPS + 1))
    ckpt = next(full.rglob("step=3.ckpt"))
    assert ckpt.is_dir()
    run_fit(fit(cache, prepared, resumed, 4, *flags, "--ckpt_path", str(ckpt)))
    after, _ = metrics(resumed)
    assert sorted(after) == [4, 5, 6]
    for step in after:
        print(f"FSDP resume step {step}: {after[step]} vs {train[step]}")
        assert float(after[step]) == pytest.approx(float(train[step]), rel=1e-3)


def test_predict_with_a_teacher_sharded_across_two_ranks_equals_one_process(cache, hf_teacher, prepared, tmp_path):
    """``pd-lightning predict`` under FSDP2 (``fsdp2.yaml``, 2 CPU ranks, gloo): the HF teacher's weights are sharded
    across the ranks, each rank predicts its own shards (7 and 6 of the 13: the rank with fewer batches pads with
    lockstep forwards, which write nothing), and the cache's content equals the 1-process cache's."""
    from pd_lightning.cache.format import content_checksum

    out = tmp_path / "cache"
    flags = ["--config", str(ROOT / "configs/trainer/fsdp2.yaml"), "--trainer.accelerator", "cpu"]
    args = predict_args(hf_teacher, prepared["tokens"], out, *flags, "--trainer.devices", "2")
    run_fit(args)  # a 2-rank predict, run as users run it
    assert (out / "index.json").exists()
    assert content_checksum(out) == content_checksum(cache)


@pytest.mark.slow
def test_fsdp2_with_activation_checkpointing_matches_one_process(cache, prepared, one_process, tmp_path):
    """``--model.activation_checkpointing true`` under FSDP2 (each block recomputed in the backward pass, its
    parameters gathered again): the validation losses still match 1 process's (measured <= 8e-8 relative)."""
    flags = ["--config", str(ROOT / "configs/trainer/fsdp2.yaml"), "--trainer.accelerator", "cpu"]
    flags += ["--trainer.devices", "2", "--model.activation_checkpointing", "true"]
    run_fit(fit(cache, prepared, tmp_path, 4, *flags))
    _, val = metrics(tmp_path)
    for step, loss in one_process.items():
        assert val[step] == pytest.approx(loss, rel=REL_TOL), (step, val[step], loss)


@pytest.mark.slow
def test_fsdp2_hsdp_on_a_two_by_two_mesh_matches_one_process(cache, prepared, one_process, tmp_path):
    """4 ranks on a (data_parallel 2, tensor_parallel 2) mesh: HSDP (replicated over the first dimension, sharded over
    the second; the head's gradient reduced over both) with batch 2 per rank = 1 process with batch 8 (measured
    <= 8e-8 relative)."""
    flags = ["--config", str(ROOT / "configs/trainer/fsdp2.yaml"), "--trainer.accelerator", "cpu"]
    flags += ["--trainer.devices", "4", "--trainer.strategy.init_args.data_parallel_size", "2"]
    flags += ["--trainer.strategy.init_args.tensor_parallel_size", "2"]
    run_fit(fit(cache, prepared, tmp_path, 2, *flags))
    _, val = metrics(tmp_path)
    for step, loss in one_process.items():
        assert val[step] == pytest.approx(loss, rel=REL_TOL), (step, val[step], loss)
