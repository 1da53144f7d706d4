"""A callback that holds a ``pd-lightning predict`` subprocess at a chosen batch (tests only).

Added with ``--trainer.callbacks+=tests.predict_gate.Gate --trainer.callbacks.path=FILE --trainer.callbacks.batch=N``
and ``PYTHONPATH`` set to the repository root. After predict batch ``N`` of global rank 0 it creates ``FILE.reached``
and waits until ``FILE`` exists (at most ``timeout`` seconds), so a test can act at an exact moment of the run (start
a second writer, send a signal) and then let it go on. Other ranks are not held themselves: they wait for rank 0 in
the run's next collective, if it has one.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L


class Gate(L.Callback):
    def __init__(self, path: str, batch: int = 0, timeout: float = 300.0) -> None:
        self.path, self.batch, self.timeout = Path(path), batch, timeout

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx=0) -> None:
        if trainer.global_rank != 0 or batch_idx != self.batch:
            return
        self.path.with_name(self.path.name + ".reached").touch()
        deadline = time.monotonic() + self.timeout
        while not self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
