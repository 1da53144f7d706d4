"""The model summary of ``pd-lightning fit`` with the student's FLOPs (Lightning's ModelSummary / RichModelSummary).

Lightning fills the summary's FLOPs column (and "Total FLOPs") by running the module's ``example_input_array``
through it; the DistillationModule has none (running a forward of a large student at summary time, on every rank and
under FSDP, is not wanted), so both read 0. ``StudentFlopsSummary`` counts them instead on a meta-device copy of the
student (no memory, no compute; as ``throughput.student_flops_per_batch``) for one training micro-batch
``(batch_size, seq_len)``, which it shows as the student's "In sizes" (and its logits as "Out sizes"): the same
meaning as Lightning's column, the FLOPs of ``DistillationModule.forward`` (the student) on that input, per layer.
Rows outside that forward (the metrics, an in-step teacher) count 0, as Lightning would count them.

``install(trainer)`` swaps the trainer's default ``ModelSummary`` / ``RichModelSummary`` callback (exactly those
classes, keeping their arguments) for one that prints this summary.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelSummary as ModelSummaryCallback
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import ModelSummary
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

UNKNOWN = "?"


def _student_name(module: torch.nn.Module) -> str | None:
    """The attribute that holds the student (``DistillationModule.model``), or None."""
    from pd_lightning.model.transformer import Transformer

    return "model" if isinstance(getattr(module, "model", None), Transformer) else None


class StudentFlopsSummary(ModelSummary):
    """``ModelSummary`` whose FLOPs are the student's forward on one ``batch_shape`` micro-batch (module docstring)."""

    def __init__(self, model: L.LightningModule, max_depth: int = 1, batch_shape: tuple[int, int] = (1, 1)) -> None:
        self._batch_shape = tuple(int(n) for n in batch_shape)
        self._counts: dict[str, dict[Any, int]] = {}
        self._total = 0
        super().__init__(model, max_depth)
        self._measure()

    def _measure(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        from pd_lightning.model.transformer import Transformer

        name = _student_name(self._model)
        if name is None:
            return
        try:
            with torch.device("meta"):
                student = Transformer(self._model.student_config)
                ids = torch.zeros(self._batch_shape, dtype=torch.long)
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                student(ids)
        except Exception as e:  # a model the meta device cannot run: the column stays Lightning's
            rank_zero_warn(f"model summary: could not count the student's FLOPs ({e})")
            return
        counts = counter.get_flop_counts()  # "Transformer", "Transformer.layers.0", ...: the modules called

        def flops(path: str, module: torch.nn.Module) -> dict[Any, int]:
            # A module never called itself (a ModuleList) holds what its children ran.
            key = type(student).__name__ + (f".{path}" if path else "")
            if key in counts:
                return dict(counts[key])
            total: dict[Any, int] = {}
            for child_name, child in module.named_children():
                for op, n in flops(f"{path}.{child_name}" if path else child_name, child).items():
                    total[op] = total.get(op, 0) + n
            return total

        self._total = counter.get_total_flops()
        for layer in self.layer_names:
            if layer == name or layer.startswith(name + "."):
                path = layer[len(name) + 1 :]
                self._counts[layer] = flops(path, student.get_submodule(path) if path else student)

    @property
    def total_flops(self) -> int:
        return self._total

    @property
    def flop_counts(self) -> dict[str, dict[Any, int]]:
        return {layer: self._counts.get(layer, {}) for layer in self.layer_names}

    def _get_summary_data(self) -> list[tuple[str, list[str]]]:
        arrays = super()._get_summary_data()
        names = [a[1] for a in arrays if a[0] == "Name"][0]
        if self._model.example_input_array is not None or not self._counts:
            return arrays
        student = _student_name(self._model)
        vocab = self._model.student_config.vocab_size
        shape = list(self._batch_shape)
        arrays.append(("In sizes", [str(shape) if n == student else UNKNOWN for n in names]))
        arrays.append(("Out sizes", [str([*shape, vocab]) if n == student else UNKNOWN for n in names]))
        return arrays


def _batch_shape(trainer: L.Trainer) -> tuple[int, int] | None:
    data = trainer.datamodule
    try:
        return int(data.batch_size), int(data.seq_len)
    except (AttributeError, TypeError, ValueError, OSError):
        return None


class _StudentSummaryMixin:
    def _summary(self, trainer: L.Trainer, pl_module: L.LightningModule):
        from lightning.pytorch.strategies.deepspeed import DeepSpeedStrategy

        shape = _batch_shape(trainer)
        deepspeed3 = isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3
        if shape is None or deepspeed3 or _student_name(pl_module) is None:
            return super()._summary(trainer, pl_module)
        return StudentFlopsSummary(pl_module, max_depth=self._max_depth, batch_shape=shape)


class StudentModelSummary(_StudentSummaryMixin, ModelSummaryCallback):
    """Lightning's ``ModelSummary`` callback with the student's FLOPs."""


class StudentRichModelSummary(_StudentSummaryMixin, RichModelSummary):
    """Lightning's ``RichModelSummary`` callback with the student's FLOPs."""


def install(trainer: L.Trainer) -> None:
    """Replace the trainer's ``ModelSummary`` / ``RichModelSummary`` callback (exactly those classes: a user's own
    subclass is left alone) by the one above, with the same arguments."""
    swap = {ModelSummaryCallback: StudentModelSummary, RichModelSummary: StudentRichModelSummary}
    for i, callback in enumerate(trainer.callbacks):
        cls = swap.get(type(callback))
        if cls is None:
            continue
        new = cls.__new__(cls)
        new.__dict__.update(callback.__dict__)  # max_depth, summarize kwargs, Rich's progress settings
        trainer.callbacks[i] = new
