"""Checkpoints that survive a kill at any moment, and a resumable checkpoint when a run is stopped with SIGTERM.

- ``AtomicCheckpointIO`` writes every checkpoint (ModelCheckpoint's step files and ``last.ckpt``, the SIGTERM
  checkpoint, Lightning's SLURM ``hpc_ckpt_*.ckpt``) to a hidden temporary file beside its target, fsyncs it and
  renames it over the target (``os.replace``, atomic on POSIX), then fsyncs the folder. A process killed during a
  save (SIGKILL, power loss) leaves the previous checkpoint of that name intact and a ``.NAME.tmp-PID`` file that no
  resume ever picks (``--ckpt_path last`` matches ``last*.ckpt`` only); the next save of that name removes it.
  Remote paths (``s3://`` ...) keep Lightning's own writer (object stores have no rename).
- ``StopCheckpoint`` saves ``last.ckpt`` (in the ModelCheckpoint's folder, so ``--ckpt_path last`` finds it) when
  Lightning stops a fit on SIGTERM before its end; ``pd-lightning fit`` then exits with ``EXIT_INTERRUPTED``.

``pd-lightning fit`` installs both on every trainer (``pd_lightning.lightning_cli.TrainCLI.instantiate_trainer``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

EXIT_INTERRUPTED = 143  # 128 + SIGTERM: what a shell reports for a process stopped by SIGTERM; never 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are all-or-nothing (module docstring)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)


def stop_checkpoint_path(trainer: L.Trainer) -> str:
    """Where a stopped run's checkpoint goes: ``last.ckpt`` in the first ModelCheckpoint's folder (found by
    ``--ckpt_path last``), else ``<default_root_dir>/last.ckpt``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "last.ckpt")


class StopCheckpoint(L.Callback):
    """On a SIGTERM stop of ``fit`` before its end, save a resumable checkpoint (``stop_checkpoint_path``).

    Lightning's SIGTERM handler only sets a flag; its loop raises ``SIGTERMException`` after the current training
    batch (all ranks together), so the checkpoint holds a whole optimizer step and the data position after it.
    Lightning's SLURM auto-requeue (SIGUSR1: ``hpc_ckpt_*.ckpt`` + ``scontrol requeue``) is left as it is.
    """

    def __init__(self) -> None:
        self.path: str | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = stop_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full state: it is resumed from
        self.path = path
        rank_zero_info(f"SIGTERM: saved a resumable checkpoint at step {trainer.global_step}: {path}")


def install(trainer: L.Trainer) -> None:
    """Atomic checkpoint writes (unless the user chose a checkpoint IO), the SIGTERM checkpoint and the throughput
    figures (``pd_lightning.throughput.TrainThroughput``) on ``trainer``."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    if not any(isinstance(c, StopCheckpoint) for c in trainer.callbacks):
        trainer.callbacks.insert(0, StopCheckpoint())
    from pd_lightning.throughput import TrainThroughput

    if not any(isinstance(c, TrainThroughput) for c in trainer.callbacks):
        trainer.callbacks.insert(0, TrainThroughput())
