"""A callback that injects a real fault into a ``pd-lightning fit`` subprocess at a chosen point (tests only).

Added with ``--trainer.callbacks+=tests.faults.Fault --trainer.callbacks.at=... --trainer.callbacks.step=N`` and
``PYTHONPATH`` set to the repository root. The fault is a real signal sent to the process itself (SIGKILL cannot
be caught: nothing of the run's own code runs after it), so its moment is exact and the test deterministic.

- ``train``: SIGKILL after the training batch that makes ``global_step == step`` (before its checkpoint is saved).
- ``validation``: SIGKILL after the first validation batch of the validation run at ``global_step == step``.
- ``save``: SIGKILL in the middle of writing ``last.ckpt`` at ``global_step == step``: whatever file the writer
  opened for it (the target itself, or a temporary file) gets half of its first large write (``write`` or a copy's
  ``os.sendfile``), flushed to disk.
- ``sigterm``: SIGTERM after the training batch at ``global_step == step`` (Lightning's handler takes it).
- ``sigint``: SIGINT (what Ctrl-C sends) after the training batch at ``global_step == step``.
- ``sigterm_save``: SIGTERM in the middle of the first checkpoint save at ``global_step == step``.
- ``sigterm_teardown``: SIGTERM in the callbacks' ``teardown`` of the fit (after Lightning has put back the signal
  handlers it found) once ``global_step == step``.
- ``sigusr1``: SIGUSR1 after the training batch at ``global_step == step`` (SLURM's requeue signal).
- ``nan``: before the training batch at ``global_step == step``, the first parameter turns NaN (a diverged run:
  the loss of that batch is NaN). Not a signal: usable in-process.
"""

from __future__ import annotations

import builtins
import os
import signal
import time
from pathlib import Path

import lightning as L


class _HalfWriter:
    """File wrapper: the first write of >= 1 KiB writes half its bytes, syncs them to disk and SIGKILLs us."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data) -> int:
        if len(data) >= 1024:
            self._f.write(bytes(data[: len(data) // 2]))
            self._f.flush()
            os.fsync(self._f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


class Fault(L.Callback):
    def __init__(self, at: str, step: int) -> None:
        kinds = (
            "train",
            "validation",
            "save",
            "sigterm",
            "sigint",
            "sigterm_save",
            "sigterm_teardown",
            "sigusr1",
            "nan",
        )
        assert at in kinds, at
        self.at, self.step = at, step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.at != "save":
            return
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            name = Path(os.fsdecode(file)).name if isinstance(file, str | bytes | os.PathLike) else ""
            if "w" in mode and "last.ckpt" in name and trainer.global_step == self.step:
                return _HalfWriter(f)
            return f

        builtins.open = open_
        real_sendfile = os.sendfile  # shutil's copy (a move across filesystems) writes through os.sendfile

        def sendfile(out_fd, in_fd, offset, count):
            name = os.path.basename(os.readlink(f"/proc/self/fd/{out_fd}"))
            if "last.ckpt" in name and trainer.global_step == self.step and count >= 1024:
                real_sendfile(out_fd, in_fd, offset, min(count, os.fstat(in_fd).st_size) // 2)
                os.fsync(out_fd)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_sendfile(out_fd, in_fd, offset, count)

        os.sendfile = sendfile

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.at == "nan" and trainer.global_step == self.step:
            next(pl_module.parameters()).data.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        signals = {
            "train": signal.SIGKILL,
            "sigterm": signal.SIGTERM,
            "sigint": signal.SIGINT,
            "sigusr1": signal.SIGUSR1,
        }
        if trainer.global_step == self.step and self.at in signals:
            os.kill(os.getpid(), signals[self.at])

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.at == "sigterm_save" and trainer.global_step == self.step and not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGTERM)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.at == "sigterm_teardown" and stage == "fit" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.at == "validation" and not trainer.sanity_checking and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class Slow(L.Callback):
    """Sleeps (tests of the throughput clock): in each validation run, in each checkpoint save, and in the first
    micro-batch of each optimizer step (inside the step: it must count)."""

    def __init__(self, validation: float = 0.0, checkpoint: float = 0.0, first_micro_batch: float = 0.0) -> None:
        self.validation, self.checkpoint, self.first_micro_batch = validation, checkpoint, first_micro_batch

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and not trainer.sanity_checking:
            time.sleep(self.validation)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        time.sleep(self.checkpoint)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            time.sleep(self.first_micro_batch)
