"""Checkpoints that survive a kill at any moment, and a resumable checkpoint when a run is stopped with SIGTERM.

- ``AtomicCheckpointIO`` writes every checkpoint (ModelCheckpoint's step files and ``last.ckpt``, the SIGTERM
  checkpoint, Lightning's SLURM ``hpc_ckpt_*.ckpt``) to a hidden temporary file beside its target, fsyncs it and
  renames it over the target (``os.replace``, atomic on POSIX), then fsyncs the folder. A process killed during a
  save (SIGKILL, power loss) leaves the previous checkpoint of that name intact and a ``.NAME.tmp-PID`` file that no
  resume ever picks (``--ckpt_path last`` matches ``last*.ckpt`` only); the next save of that name removes it.
  Remote paths (``s3://`` ...) keep Lightning's own writer (object stores have no rename).
- ``StopCheckpoint`` saves ``last.ckpt`` (in the ModelCheckpoint's folder, so ``--ckpt_path last`` finds it) when
  Lightning stops a fit on SIGTERM before its end; ``pd-lightning fit`` then exits with ``EXIT_INTERRUPTED``. Its
  ``signals()`` (entered by ``TrainCLI.fit``) makes SIGINT (Ctrl-C) stop the run the same way (exit
  ``EXIT_SIGINT``; a second Ctrl-C stops at once), and makes either signal stop nothing once every optimizer step of
  the run is done (``training_complete``): the final validation, checkpoints and teardown still happen, exit 0.

``pd-lightning fit`` installs both on every trainer (``pd_lightning.lightning_cli.TrainCLI.instantiate_trainer``).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.utilities import _is_max_limit_reached
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

EXIT_INTERRUPTED = 143  # 128 + SIGTERM: what a shell reports for a process stopped by SIGTERM; never 0
EXIT_SIGINT = 130  # 128 + SIGINT: Ctrl-C, as a shell reports it (and as `pd-lightning sweep` exits on Ctrl-C)


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
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            cause = write_error(e)
            # One error naming the checkpoint: torch's zip writer re-raises a failed write as a RuntimeError on top
            # of the OSError (two tracebacks), and a failed write() / fsync() names no file.
            if cause is not None and (cause is not e or cause.filename is None):
                raise OSError(cause.errno, os.strerror(cause.errno), str(target)) from None
            raise
        _fsync_dir(target.parent)


def write_error(e: BaseException | None) -> OSError | None:
    """The OS write error (full disk, read-only, permission, ...: ``paths.WRITE_ERRNOS``) behind ``e``: ``e`` itself,
    or what it was raised from or while handling; None when there is none."""
    from pd_lightning.paths import WRITE_ERRNOS

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def stop_checkpoint_path(trainer: L.Trainer) -> str:
    """Where a stopped run's checkpoint goes: ``last.ckpt`` in the first ModelCheckpoint's folder (found by
    ``--ckpt_path last``), else ``<default_root_dir>/last.ckpt``."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            return os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
    return os.path.join(trainer.default_root_dir, "last.ckpt")


def training_complete(trainer: L.Trainer) -> bool:
    """Every optimizer step of the fit is done: ``max_steps`` reached, or the last batch of the last epoch reached.
    What may still run (the final validation, checkpoint saves, teardown) does not make the run unfinished.
    (Lightning finishes a batch it has started before it stops on SIGTERM, so a signal during the last batch is
    one after it.)"""
    if trainer.state.fn != "fit":
        return False
    loop = trainer.fit_loop
    if _is_max_limit_reached(trainer.global_step, loop.max_steps):
        return True
    max_epochs = loop.max_epochs
    if max_epochs is None or max_epochs < 0:
        return False
    if loop.epoch_progress.current.processed >= max_epochs:
        return True
    return trainer.current_epoch + 1 >= max_epochs and loop.epoch_loop._num_ready_batches_reached()


class StopCheckpoint(L.Callback):
    """On a SIGTERM (or, within ``signals()``, SIGINT) stop of ``fit`` before its end, save a resumable checkpoint
    (``stop_checkpoint_path``).

    Lightning's SIGTERM handler only sets a flag; its loop raises ``SIGTERMException`` after the current training
    batch (all ranks together), so the checkpoint holds a whole optimizer step and the data position after it.
    ``signals()`` sets the same flag on SIGINT (Lightning's own Ctrl-C handling interrupts the step mid-way and saves
    nothing), and clears it for a signal that arrives once ``training_complete``.
    Lightning's SLURM auto-requeue (SIGUSR1: ``hpc_ckpt_*.ckpt`` + ``scontrol requeue``) is left as it is.

    Attributes (read by ``TrainCLI.fit``): ``path`` (the checkpoint saved on the stop), ``stopped_by`` (the signal
    that stopped the run before its end: ``"SIGTERM"`` / ``"SIGINT"``), ``after_end`` (a signal that arrived once
    training was complete), ``sigints`` (Ctrl-Cs received).
    """

    def __init__(self) -> None:
        self.path: str | None = None
        self.stopped_by: str | None = None
        self.after_end: str | None = None
        self.sigints = 0
        self._trainer: L.Trainer | None = None

    # ---- the signals, for the duration of a fit ------------------------------------------------------------------
    @contextmanager
    def signals(self, trainer: L.Trainer):
        """SIGTERM and SIGINT handlers for ``trainer.fit`` (main thread only). Lightning registers its SIGTERM
        handler inside ``fit`` and calls the one it found (this one) after its own, so a SIGTERM sets Lightning's
        flag first and ``_note`` then decides; Lightning puts this handler back at its teardown, so a signal during
        the teardown comes here too. The previous handlers are restored on exit."""
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGTERM, self._on_sigterm)
        if previous[signal.SIGINT] is not signal.SIG_IGN:  # a background job of a shell ignores Ctrl-C: it still does
            signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _on_sigterm(self, signum, frame) -> None:
        self._note("SIGTERM")

    def _on_sigint(self, signum, frame) -> None:
        self.sigints += 1
        if self.sigints > 1 and not training_complete(self._trainer):
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, without the checkpoint
        self._note("SIGINT")

    def _note(self, name: str) -> None:
        trainer = self._trainer
        connector = trainer._signal_connector  # Lightning's flag, read by its loops: `trainer.received_sigterm`
        if training_complete(trainer):
            self.after_end = self.after_end or name
            connector.received_sigterm = False  # a finished run is not stopped by its final validation/checkpoint
            return
        self.stopped_by = self.stopped_by or name
        connector.received_sigterm = True  # stop after the current batch, as Lightning does on SIGTERM

    def _restate(self, trainer: L.Trainer) -> None:
        """A signal received before Lightning registered its handlers (which clears its flag): stop now."""
        if self.stopped_by and not training_complete(trainer):
            trainer._signal_connector.received_sigterm = True

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restate(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restate(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # A signal during the last batch: Lightning finishes that batch, after which the run is complete.
        if trainer.received_sigterm and training_complete(trainer):
            self.after_end = self.after_end or self.stopped_by or "SIGTERM"
            trainer._signal_connector.received_sigterm = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        path = stop_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # the full state: it is resumed from
        self.path = path
        how = self.stopped_by or "SIGTERM"
        rank_zero_info(f"{how}: saved a resumable checkpoint at step {trainer.global_step}: {path}")


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
