"""Teacher targets computed inside the student's training step: a frozen teacher, or a co-trained one.

Both go through the same ``LogitsProcessor`` and the same losses as the offline cache; only the storage round trip
(quantised ``-log p`` in steps of ``nlogp_max / 16383``, float16 statistics) is skipped, so in-step targets equal
cached ones within the cache's value precision (``tests/test_online.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pd_lightning.distill.objective import lm_kd_loss
from pd_lightning.distill.processors import LogitsProcessor, position_keys
from pd_lightning.distill.target import SparseTarget
from pd_lightning.model.transformer import Transformer
from pd_lightning.online.collect import TargetCollector
from pd_lightning.teacher import Teacher, load_teacher


def batch_keys(batch: dict[str, Tensor]) -> Tensor | None:
    """Per-position keys of a batch for stochastic processors (as ``pd-lightning predict``), when it has indices."""
    if "sequence_index" not in batch:
        return None
    return position_keys(batch["sequence_index"], batch["input_ids"].shape[1])


def transformer_targets(
    model: Transformer,
    batch: dict[str, Tensor],
    processor: LogitsProcessor,
    gammas: tuple[float, ...],
    chunk_size: int = 0,
    fused: bool = True,
):
    """A pd-lightning ``Transformer``'s LM loss on ``batch`` and, from the same loss pass (chunk by chunk, never the
    full ``(N, V)`` logits), its sparse target. Gradients flow into the LM loss when grad mode is on and the model's
    weights require grad (co-training); the target is always computed under ``no_grad``."""
    hidden = model(batch["input_ids"], return_hidden=True)  # (B, T, H)
    collector = TargetCollector(processor, batch_keys(batch), gammas)
    out = lm_kd_loss(
        hidden.reshape(-1, hidden.shape[-1]), model.output_weight, batch["labels"].reshape(-1), None, 0.0, None,
        chunk_size=chunk_size, fused=fused, observe=collector,
    )  # fmt: skip
    return out, collector.target()


class FrozenTeacher:
    """A teacher loaded with :func:`~pd_lightning.teacher.load_teacher` (HF folder or pd-lightning ``.ckpt``),
    frozen (``requires_grad=False``, ``eval()``), run under ``no_grad``.

    Deliberately not an ``nn.Module`` attribute of the student's LightningModule: its weights stay out of the
    optimizer, the gradient clipping, the finiteness check and the student's checkpoints (it is reloaded from its
    path on resume). It follows the student's device on first use.
    """

    def __init__(self, path: str, dtype: str = "float32", trust_remote_code: bool = False) -> None:
        self.path = path
        self.teacher: Teacher = load_teacher(path, dtype, trust_remote_code, flag="--model.teacher")
        self.teacher.model.requires_grad_(False).eval()

    @property
    def vocab_size(self) -> int:
        return self.teacher.vocab_size

    @torch.no_grad()
    def targets(
        self, batch: dict[str, Tensor], processor: LogitsProcessor, gammas: tuple[float, ...], chunk_size: int = 0
    ) -> SparseTarget:
        """The teacher's sparse target for every position of ``batch`` (``(B * T)`` rows, sequence-major)."""
        model = self.teacher.model
        device = batch["input_ids"].device
        if next(model.parameters()).device != device:
            model.to(device)
        if isinstance(model, Transformer):  # chunked: the (N, V) logits never exist
            return transformer_targets(model, batch, processor, gammas, chunk_size)[1]
        logits = model(batch["input_ids"])  # (B, T, V); HF models return full logits anyway
        return processor(logits, batch_keys(batch), gammas=gammas)
