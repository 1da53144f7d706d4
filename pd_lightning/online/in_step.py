"""Teacher targets computed inside the student's training step: a frozen teacher, or a co-trained one.

Both go through the same ``LogitsProcessor`` and the same losses as the offline cache; only the storage round trip
(quantised ``-log p`` in steps of ``nlogp_max / 16383``, float16 statistics) is skipped, so in-step targets equal
cached ones within the cache's value precision (``tests/test_online.py``).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from pd_lightning.distill.objective import lm_kd_loss
from pd_lightning.distill.processors import LogitsProcessor, position_keys
from pd_lightning.distill.target import SparseTarget
from pd_lightning.model.transformer import Transformer
from pd_lightning.online.collect import TargetCollector
from pd_lightning.teacher import Teacher, _HFLogits, load_teacher


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
    path on resume). It follows the student's device on first use, or is sharded with the student under FSDP2
    (:meth:`shard`).
    """

    def __init__(self, path: str, dtype: str = "float32", trust_remote_code: bool = False) -> None:
        self.path = path
        self.teacher: Teacher = load_teacher(path, dtype, trust_remote_code, flag="--model.teacher")
        self.teacher.model.requires_grad_(False).eval()
        self.pair = None  # a crosstok.pair.TokenizerPair when the teacher reads its own tokens (use_tokenizers)

    @property
    def vocab_size(self) -> int:
        return self.teacher.vocab_size

    def shard(self, mesh) -> tuple[int, int]:
        """``fully_shard`` (FSDP2) the frozen teacher over ``mesh``, as the student: one unit per decoder layer, an
        untied output head on its own, the root last. Each rank then stores its shard of every weight (rows split
        over the mesh's sharding dimension, as the student's); every teacher forward all-gathers one unit at a time
        and frees it after (:meth:`targets` frees the root's too), so the full teacher never sits on a rank between
        steps. Frozen: no gradient, hence no reduce-scatter, and no optimizer state. Every rank must call
        :meth:`targets` the same number of times (the training step does: ``alpha`` is the same on every rank).

        HF teachers: the layers of ``model.model.layers`` (Llama-like) are units; a model without that list is one
        unit (sharded at rest, gathered whole in its forward). Returns ``(elements on this rank, elements in all)``
        and prints them, one line per rank. Idempotent (``configure_model`` may run again).
        """
        from torch.distributed.fsdp import fully_shard

        model = self.teacher.model
        if not isinstance(model, FSDPModule):
            inner = model.model if isinstance(model, _HFLogits) else model
            if isinstance(inner, Transformer):
                layers, head, embed = inner.layers, inner.lm_head, inner.embed
            else:
                layers = getattr(getattr(inner, "model", None), "layers", None) or []
                head, embed = inner.get_output_embeddings(), inner.get_input_embeddings()
            for layer in layers:
                fully_shard(layer, mesh=mesh)
            if head is not None and head.weight is not embed.weight:
                fully_shard(head, mesh=mesh)
            fully_shard(model, mesh=mesh)
        local = sum(p.to_local().numel() for p in model.parameters())
        total = sum(p.numel() for p in model.parameters())
        # One write per line (ranks share the launcher's stdout; print's separate "\n" write could interleave).
        sys.stdout.write(
            f"pd-lightning: rank {mesh.get_rank()}: in-step teacher {self.path}: {local} of {total} parameters "
            "on this rank (FSDP2)\n"
        )
        sys.stdout.flush()
        return local, total

    def use_tokenizers(self, student_folder: str | None, student_vocab: int, rule: str, tokens=None) -> None:
        """Read each batch's text through the teacher's own tokenizer (``crosstok.pair``): load both tokenizers,
        build the vocabulary map, and refuse (one line) tokenizers that do not round-trip the text of the token
        file's first rows (``tokens``, a ``TokenFile``, when the data has one).

        Args:
            student_folder: the data's tokenizer folder.
            student_vocab: the student's vocabulary size.
            rule: ``tail`` or ``prefix``.
        """
        from pathlib import Path

        from pd_lightning.crosstok.pair import CHECK_ROWS, TokenizerPair

        flag = f"--model.teacher {self.path!r}"
        folder = self.path if Path(self.path).is_dir() else self.teacher.tokenizer_path
        self.pair = TokenizerPair.load(
            student_folder, student_vocab, folder, self.vocab_size, rule, student_flag="--data",
            teacher_flag=flag, rule_flag="--model.teacher_cross_tokenizer_rule",
            teacher_fingerprint=self.teacher.tokenizer_fingerprint,
        )  # fmt: skip
        if tokens is not None:
            split = "train" if tokens.lengths["train"] else "val"
            rows = tokens.rows(split, slice(0, min(CHECK_ROWS, tokens.lengths[split]))).tolist()
            self.pair.check_round_trip(rows, f"--data {str(tokens.path)!r}", flag, what=f"{split} sequence")

    @torch.no_grad()
    def targets(
        self, batch: dict[str, Tensor], processor: LogitsProcessor, gammas: tuple[float, ...], chunk_size: int = 0
    ) -> SparseTarget:
        """The teacher's sparse target for every position of ``batch`` (``(B * T)`` rows, sequence-major); over
        the student's ids (aligned and mapped, unaligned rows empty) for a teacher with its own tokenizer."""
        model = self.teacher.model
        device = batch["input_ids"].device
        if next(model.parameters()).device != device:
            model.to(device)
        if self.pair is not None:
            target = self._cross_tokenizer_targets(batch, processor, gammas)
        elif isinstance(model, Transformer):  # chunked: the (N, V) logits never exist
            target = transformer_targets(model, batch, processor, gammas, chunk_size)[1]
        else:
            logits = model(batch["input_ids"])  # (B, T, V); HF models return full logits anyway
            target = processor(logits, batch_keys(batch), gammas=gammas)
        if isinstance(model, FSDPModule):  # FSDP2 keeps the root unit gathered after its forward; free it (no backward)
            model.reshard()
        return target

    def _cross_tokenizer_targets(
        self, batch: dict[str, Tensor], processor: LogitsProcessor, gammas: tuple[float, ...]
    ) -> SparseTarget:
        """Each row (its inputs and last label) aligned with the teacher's tokenization of its text; the teacher run
        over that (rows right-padded); its targets at the aligned positions mapped onto student ids."""
        inputs, labels = batch["input_ids"], batch["labels"]  # (B, T)
        length = inputs.shape[1]
        last = labels[:, -1].tolist()
        rows = [r + ([t] if t >= 0 else []) for r, t in zip(inputs.tolist(), last)]
        index = batch.get("sequence_index")
        names = [f"sequence {int(i)}" for i in index] if index is not None else None
        try:
            ids, positions = self.pair.teacher_batch(rows, length, names)
        except ValueError as e:
            raise ValueError(f"--model.teacher {self.path!r}: {e}") from None
        logits = self.teacher.model(ids.to(inputs.device))  # (B, T_t, V_t)
        return self.pair.targets(logits, positions, processor, batch_keys(batch), gammas).target
