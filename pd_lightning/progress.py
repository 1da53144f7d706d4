"""A callback that prints one line per validation run, so logs (and the demo) show the loss falling."""

from __future__ import annotations

import lightning as L


class ValidationReport(L.Callback):
    """Print ``step N  val/loss X  val/ppl Y  val/bpb Z`` after every validation run (rank 0 only; ``val/bpb`` when
    the module logged it)."""

    def __init__(self) -> None:
        self.history: list[tuple[int, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        if "val/loss" not in metrics:
            return
        loss = float(metrics["val/loss"])
        ppl = float(metrics.get("val/ppl", float("nan")))
        bpb = f"  val/bpb {float(metrics['val/bpb']):.4f}" if "val/bpb" in metrics else ""
        if trainer.state.fn != "fit":  # `validate` of a checkpoint: its own step counter is 0, no curve to extend
            print(f"validate  val/loss {loss:.4f}  val/ppl {ppl:.2f}{bpb}", flush=True)
            return
        self.history.append((trainer.global_step, loss))
        trend = ""
        if len(self.history) > 1:
            trend = f"  (first {self.history[0][1]:.4f}, change {loss - self.history[0][1]:+.4f})"
        print(f"step {trainer.global_step:>6d}  val/loss {loss:.4f}  val/ppl {ppl:.2f}{bpb}{trend}", flush=True)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [tuple(x) for x in state_dict.get("history", [])]
