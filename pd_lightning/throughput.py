"""Training throughput per optimizer step, without validation or checkpoint time, in Lightning's conventions.

``TrainThroughput`` (installed on every ``pd-lightning fit`` trainer) logs, at each optimizer step:

- ``train/tokens_per_s``: input tokens of the step's micro-batches on all ranks / the step's wall time. The step's
  time runs from the end of the previous optimizer step to the end of this one (data loading, forward, backward,
  optimizer), less the time spent in validation runs and in checkpoint saves in between. Gradient accumulation:
  all micro-batches of the step count, once.

and, through ``lightning.fabric.utilities.throughput.Throughput`` (what ``lightning.pytorch.callbacks.
ThroughputMonitor`` computes, with the same key names under ``train/``; on the same excluded-time clock) at each
logging step once ``window_size`` optimizer steps were timed, over the last ``window_size`` of them:
``train/device/batches_per_sec``, ``train/device/samples_per_sec``, ``train/device/items_per_sec`` (tokens/s of
one rank) and, with several ranks, the all-rank ``train/batches_per_sec``, ``train/samples_per_sec``,
``train/items_per_sec``; ``train/device/flops_per_sec`` (and ``train/flops_per_sec``) when
the model's FLOPs per micro-batch could be measured (``measure_flops`` on a meta-device copy: forward + backward of
the student with its full output head), and ``train/device/mfu`` when the device's peak FLOPs are known
(``get_available_flops``: CUDA GPUs and TPUs, not CPUs).
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops, measure_flops
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "64": torch.float64}


def _compute_dtype(trainer: L.Trainer) -> torch.dtype:
    precision = str(trainer.precision)
    for prefix, dtype in _DTYPES.items():
        if precision.startswith(prefix):
            return dtype
    return torch.float32


def student_flops_per_batch(pl_module: L.LightningModule, batch_shape: tuple[int, int]) -> int | None:
    """FLOPs of forward + backward of the student (full output head) on one ``(B, T)`` micro-batch."""
    from pd_lightning.model.transformer import Transformer

    config = getattr(pl_module, "student_config", None)
    if config is None:
        return None
    try:
        with torch.device("meta"):
            model = Transformer(config)
            ids = torch.zeros(batch_shape, dtype=torch.long)
        return int(measure_flops(model, lambda: model(ids), loss_fn=lambda logits: logits.sum()))
    except Exception as e:  # a model the meta device cannot run: throughput without FLOPs
        rank_zero_warn(f"TrainThroughput: could not measure the student's FLOPs ({e}); no MFU / FLOPs logged")
        return None


class TrainThroughput(L.Callback):
    """Per-optimizer-step ``train/tokens_per_s`` and Lightning's ``Throughput`` figures (module docstring).

    Args:
        window_size: optimizer steps averaged in the ``Throughput`` figures.
    """

    def __init__(self, window_size: int = 10) -> None:
        self.window_size = window_size
        self.throughput: Throughput | None = None
        self.flops_per_batch: int | None = None
        self._measured = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._time_checkpoints(trainer)
        available = get_available_flops(trainer.strategy.root_device, _compute_dtype(trainer))
        self.throughput = Throughput(
            available_flops=available, world_size=trainer.world_size, window_size=self.window_size
        )
        self._t_last: float | None = None
        self._excluded = 0.0  # validation seconds since the last step
        self._io_mark = 0.0
        self._elapsed = 0.0
        self._steps = self._samples = self._tokens = 0
        self._step_samples = self._step_tokens = self._step_batches = 0

    def _now(self, trainer: L.Trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    @staticmethod
    def _io_seconds(trainer: L.Trainer) -> float:
        return float(getattr(trainer, "_pd_checkpoint_seconds", 0.0))

    @staticmethod
    def _time_checkpoints(trainer: L.Trainer) -> None:
        """Count the wall time of every ``trainer.save_checkpoint`` (state gathering, callbacks' hooks, writing,
        barrier), whoever calls it (ModelCheckpoint, the SIGTERM checkpoint, Lightning's SLURM requeue)."""
        if hasattr(trainer, "_pd_checkpoint_seconds"):
            return
        trainer._pd_checkpoint_seconds = 0.0
        save = trainer.save_checkpoint

        def timed_save_checkpoint(*args, **kwargs):
            start = time.perf_counter()
            try:
                return save(*args, **kwargs)
            finally:
                trainer._pd_checkpoint_seconds += time.perf_counter() - start

        trainer.save_checkpoint = timed_save_checkpoint

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if self.throughput is not None and self._t_last is None:  # first step (also after a resume)
            self._t_last = self._now(trainer)
            self._io_mark = self._io_seconds(trainer)
            self._excluded = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.throughput is None or self._t_last is None:
            return
        ids = batch["input_ids"]
        self._step_batches += 1
        self._step_samples += ids.shape[0]
        self._step_tokens += ids.numel()
        if not self._measured:
            self._measured = True
            self.flops_per_batch = student_flops_per_batch(pl_module, tuple(ids.shape))
        if trainer.fit_loop._should_accumulate():
            return
        now = self._now(trainer)
        io = self._io_seconds(trainer)
        seconds = max(now - self._t_last - self._excluded - (io - self._io_mark), 1e-9)
        self._t_last, self._io_mark, self._excluded = now, io, 0.0
        rate = self._step_tokens * trainer.world_size / seconds
        pl_module.log("train/tokens_per_s", rate, on_step=True, prog_bar=True)
        self._elapsed += seconds
        self._steps += 1
        self._samples += self._step_samples
        self._tokens += self._step_tokens
        flops = None if self.flops_per_batch is None else self.flops_per_batch * self._step_batches
        self.throughput.update(
            time=self._elapsed, batches=self._steps, samples=self._samples, lengths=self._tokens, flops=flops
        )
        self._step_samples = self._step_tokens = self._step_batches = 0
        if trainer._logger_connector.should_update_logs:
            metrics = self.throughput.compute()
            pl_module.log_dict({f"train/{k}": float(v) for k, v in metrics.items() if "/" in k or "_per_" in k})

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_start = (self._now(trainer), self._io_seconds(trainer))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.throughput is None or self._t_last is None or not hasattr(self, "_val_start"):
            return
        t0, io0 = self._val_start
        # Checkpoint saves during the validation run are subtracted with the others at the step's end: count once.
        self._excluded += (self._now(trainer) - t0) - (self._io_seconds(trainer) - io0)
