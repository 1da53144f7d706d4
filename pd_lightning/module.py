"""``DistillationModule``: the LightningModule that wires the student, the loss plug-ins and the schedules.

Loss per step: L = (1 - alpha(step)) * L_lm + alpha(step) * L_kd  (``pd_lightning.distill.objective``).
With ``loss=None`` (the default) and alpha = 0 this is plain LM pre-training.

Logged: ``train/loss``, ``train/lm_loss``, ``train/kd_loss`` ... of each step; ``train/ppl`` = exp(token-weighted
mean LM loss over the steps since the last logged one); ``val/loss`` = token-weighted mean LM loss over the whole
validation set and ``val/ppl`` = exp(``val/loss``) (``TokenMeanLoss``); ``val/bpb`` = the same validation nats / ln 2
/ the UTF-8 bytes of the target tokens (``pd_lightning.crosstok.bytes``), when the data names its tokenizer.
Throughput figures come from ``pd_lightning.throughput.TrainThroughput``, which ``pd-lightning fit`` adds to the
trainer. A non-finite loss, or a step that makes the weights non-finite, stops the run (``NonFiniteLossError``)
before any checkpoint holds them.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torchmetrics import Metric

from pd_lightning.crosstok.bytes import BitsPerByte, byte_lengths, target_bytes, tokenizer_folder
from pd_lightning.distill.losses import DistillLoss
from pd_lightning.distill.lr import WSDLR, Cosine, LRSchedule
from pd_lightning.distill.objective import lm_kd_loss
from pd_lightning.distill.processors import LogitsProcessor, TopPK
from pd_lightning.distill.schedules import WSD, AlphaScheduler, WSDBeta
from pd_lightning.distill.target import SparseTarget
from pd_lightning.distill.temperature import TargetTransform
from pd_lightning.model.config import StudentConfig
from pd_lightning.model.transformer import Transformer


class TokenMeanLoss(Metric):
    """Token-weighted mean of per-batch mean losses, ``sum_b loss_b n_b / sum_b n_b`` (fp64 sums, over all ranks
    on ``compute`` unless ``sync_on_compute=False``): the mean loss per token of everything it was updated with.

    (torchmetrics' ``MeanMetric`` would do, but with ``nan_strategy="disable"`` it drops the weights, and its other
    strategies hide a NaN loss.)
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss: Tensor, tokens: Tensor) -> None:
        self.total += loss.detach().double() * tokens
        self.count += tokens

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


class NonFiniteLossError(ValueError):
    """The training loss turned NaN / inf (``pd-lightning fit`` prints it as one line and exits 2)."""


def link_wsd_config(model) -> None:
    """``link_wsd`` on a parsed ``model`` config (jsonargparse Namespace) before anything is instantiated: a WSD /
    WSDBeta alpha takes the WSDLR learning rate's ``warmup_fraction`` and ``decay_fraction``, so config.yaml, the
    logged hyperparameters and the checkpoint's show the values used."""
    import importlib

    def cls(spec):
        if spec is None or not spec.get("class_path"):
            return None
        module, name = spec["class_path"].rsplit(".", 1)
        return getattr(importlib.import_module(module), name, None)

    if model is None or not model.get("link_wsd", True):
        return
    lr, alpha = model.get("lr_schedule"), model.get("alpha")
    lr_cls, alpha_cls = cls(lr), cls(alpha)
    if lr_cls is None or alpha_cls is None or not issubclass(lr_cls, WSDLR) or not issubclass(alpha_cls, WSD | WSDBeta):
        return
    for key in ("warmup_fraction", "decay_fraction"):
        alpha["init_args"][key] = lr["init_args"][key]


class DistillationModule(L.LightningModule):
    """Pre-trains a student on (1 - alpha) * LM loss + alpha * KD loss.

    Args:
        student: the student's shape (``--model.student.preset 1.9B`` or explicit fields).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (applied to matrices only, not to norms).
        betas: AdamW betas.
        eps: AdamW epsilon.
        lr_schedule: learning-rate schedule as a function of the step (Cosine, WSDLR, Constant); None = Cosine().
        loss: KD divergence (a ``DistillLoss``: KLD, NLL, MSE, ReverseKL, JSD, TVD); None = LM loss only.
        temperature: transform of the teacher target (StaticTemperature, NormKD, WTTM, AdaKD_SD, AdaKD_H).
        alpha: schedule of the KD weight alpha (an ``AlphaScheduler``); default Constant(0) = LM only.
        fused_loss: compute LM + KD from the hidden states in token chunks without materialising the (tokens x vocab)
            logits or their gradient. On by default: it was faster at every size measured (vocab 4,096 to 151,552;
            benchmarks/RESULTS.md) besides using ~0.1x the loss memory; off = the plain autograd path.
        loss_chunk_size: tokens per chunk of the fused loss (0 = automatic).
        activation_checkpointing: recompute each block in the backward pass to save memory.
        max_steps: total optimizer steps the schedules span; None = the trainer's estimated stepping batches.
        link_wsd: when the LR schedule is WSDLR and alpha is WSD / WSDBeta, alpha takes the LR's phase edges
            (warmup_fraction, decay_fraction), so the two are never typed twice and cannot drift apart.
        teacher: a teacher in the training step (HF folder or pd-lightning ``.ckpt``): frozen, under no_grad, no
            optimizer state, not in the student's checkpoints; its sparse targets replace a cache's
            (``pd_lightning.online.in_step``).
        co_train: the shape of a teacher pre-trained from scratch together with the student in this run (LM loss,
            same optimizer and LR schedule); the student distils from its current logits, read from the teacher's
            own loss pass. Both are checkpointed. Its ``vocab_size`` is the student's (the data's). Excludes
            ``teacher``.
        teacher_processor: truncation of the in-step / co-trained teacher's logits (default TopPK(0.95, 100)).
        teacher_power_gammas: gammas whose ``U_gamma`` the in-step targets carry (default [0.5], as predict).
        teacher_dtype: weights dtype of ``teacher`` (float32, bfloat16, float16).
        teacher_cross_tokenizer: ``auto`` (default): an in-step ``teacher`` whose tokenizer differs from the data's
            reads each batch's text with its own tokenizer, its targets aligned and mapped onto the student's ids
            (README "Cross-tokenizer distillation"); ``always``: also when the tokenizers are equal (an exactness
            check).
        teacher_cross_tokenizer_rule: such a teacher's tokens without an exact student match: ``tail`` (default) or
            ``prefix`` (as ``predict --model.cross_tokenizer_rule``).
    """

    def __init__(
        self,
        student: StudentConfig,
        lr: float = 6e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        lr_schedule: LRSchedule | None = None,
        loss: DistillLoss | None = None,
        temperature: TargetTransform | None = None,
        alpha: AlphaScheduler | None = None,
        fused_loss: bool = True,
        loss_chunk_size: int = 0,
        activation_checkpointing: bool = False,
        max_steps: int | None = None,
        link_wsd: bool = True,
        teacher: str | None = None,
        co_train: StudentConfig | None = None,
        teacher_processor: LogitsProcessor | None = None,
        teacher_power_gammas: list[float] | None = None,
        teacher_dtype: str = "float32",
        teacher_cross_tokenizer: Literal["auto", "always"] = "auto",
        teacher_cross_tokenizer_rule: Literal["tail", "prefix"] = "tail",
    ) -> None:
        super().__init__()
        from pd_lightning.crosstok.pair import check_rule

        if teacher_cross_tokenizer not in ("auto", "always"):
            raise ValueError(f"--model.teacher_cross_tokenizer must be auto or always, got {teacher_cross_tokenizer!r}")
        self.teacher_cross_tokenizer = teacher_cross_tokenizer
        self.teacher_cross_tokenizer_rule = check_rule(
            teacher_cross_tokenizer_rule, "--model.teacher_cross_tokenizer_rule"
        )
        if lr <= 0:
            raise ValueError(f"--model.lr must be positive, got {lr}")
        if loss_chunk_size < 0:
            raise ValueError(f"--model.loss_chunk_size must be >= 0, got {loss_chunk_size}")
        if link_wsd and isinstance(lr_schedule, WSDLR) and isinstance(alpha, WSD | WSDBeta):
            # Before save_hyperparameters, so the saved / logged alpha is the one used. (`pd-lightning fit` links
            # the parsed config already -- `link_wsd_config` -- so its config.yaml and hparams agree too.)
            alpha.warmup_fraction = lr_schedule.warmup_fraction
            alpha.decay_fraction = lr_schedule.decay_fraction
        self.save_hyperparameters()
        self.student_config = student
        self.loaded_step: int | None = None  # the optimizer step of the checkpoint last loaded (on_load_checkpoint)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.lr_schedule = lr_schedule if lr_schedule is not None else Cosine()
        self.kd_loss = loss
        self.temperature = temperature
        self.alpha_schedule = alpha
        self.fused_loss, self.loss_chunk_size = fused_loss, loss_chunk_size
        self.max_steps = max_steps
        self.model = Transformer(student, activation_checkpointing=activation_checkpointing)
        # Token-weighted mean LM loss: of the validation set (val/loss, val/ppl), and of the training steps since the
        # last logged one (train/ppl; this rank's, like train/loss). Metric states are not in the state_dict.
        self.val_lm = TokenMeanLoss()
        self.train_lm_window = TokenMeanLoss(sync_on_compute=False)
        # Bits per byte of the validation set (val/bpb): nats and bytes summed over batches and ranks, then divided.
        # The bytes per token id come from the data's tokenizer, read once per run in `setup` (None: not logged).
        self.val_bpb = BitsPerByte()
        self.token_byte_lengths: Tensor | None = None  # (V,) int64
        self.logit_observer = None  # set during its window by pd_lightning.online.recorder.LogitRecorder
        self._init_online_teacher(teacher, co_train, teacher_processor, teacher_power_gammas, teacher_dtype)

    def _init_online_teacher(self, teacher, co_train, processor, gammas, dtype) -> None:
        """The in-step frozen teacher (``self.frozen_teacher``) or the co-trained one (``self.teacher_model``)."""
        from pd_lightning.online.in_step import FrozenTeacher

        if teacher is not None and co_train is not None:
            raise ValueError("--model.teacher and --model.co_train exclude each other: give one")
        self.teacher_processor = processor if processor is not None else TopPK()
        self.teacher_power_gammas = tuple(float(g) for g in ([0.5] if gammas is None else gammas))
        self.frozen_teacher = None if teacher is None else FrozenTeacher(teacher, dtype)
        self.teacher_model = None
        if co_train is not None:
            # It reads the student's tokens: its vocabulary is the student's (the data's), whatever a preset says.
            co_train.vocab_size = self.student_config.vocab_size
            self.teacher_model = Transformer(co_train)

    # ---- schedules ----------------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self._trainer is not None and math.isfinite(self.trainer.estimated_stepping_batches):
            return int(self.trainer.estimated_stepping_batches)
        raise ValueError("set --trainer.max_steps (or --model.max_steps): the schedules need the run's length")

    def alpha_at(self, step: int) -> float:
        return 0.0 if self.alpha_schedule is None else float(self.alpha_schedule(step, self.total_steps))

    # ---- steps --------------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def _loss(self, batch: dict[str, Tensor], alpha: float, observe=None, target: SparseTarget | None = None):
        hidden = self.model(batch["input_ids"], return_hidden=True)  # (B, T, C)
        if target is None:
            target = SparseTarget.from_batch(batch) if alpha > 0 or self.kd_loss is not None else None
        return lm_kd_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            self.model.output_weight,
            batch["labels"].reshape(-1),
            target=target,
            alpha=alpha,
            loss=self.kd_loss,
            temperature=self.temperature,
            chunk_size=self.loss_chunk_size,
            fused=self.fused_loss,
            observe=observe,
        )

    def _online_target(self, batch: dict[str, Tensor], alpha: float):
        """``(target, teacher_out)``: the in-step teacher's sparse target (or None) and the co-trained teacher's
        loss output (or None; its ``total`` carries the teacher's gradient)."""
        from pd_lightning.online.in_step import transformer_targets

        need = alpha > 0 or self.kd_loss is not None
        if self.teacher_model is not None:  # every step: the teacher trains whatever alpha is
            out, target = transformer_targets(
                self.teacher_model, batch, self.teacher_processor, self.teacher_power_gammas, self.loss_chunk_size,
                self.fused_loss,
            )  # fmt: skip
            return (target if need else None), out
        if self.frozen_teacher is not None and need:
            target = self.frozen_teacher.targets(batch, self.teacher_processor, self.teacher_power_gammas,
                                                 self.loss_chunk_size)  # fmt: skip
            return target, None
        return None, None

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        alpha = self.alpha_at(self.global_step)
        target, teacher_out = self._online_target(batch, alpha)
        out = self._loss(batch, alpha, observe=self.logit_observer, target=target)
        if teacher_out is not None:  # co-training: one backward through both (independent: the target is detached)
            self.log("train/teacher_lm_loss", teacher_out.lm, on_step=True, on_epoch=False)
            out.total = out.total + teacher_out.total
        self._check_finite(out, alpha)
        log = dict(on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        self.log("train/loss", out.total, prog_bar=True, **log)
        self.log("train/lm_loss", out.lm, **log)
        self.train_lm_window.update(out.lm, self._lm_tokens(batch))
        self.log("train/ppl", torch.exp(self.train_lm_window.compute()), **log)  # over the logging window
        self.log("train/alpha", alpha, **log)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], **log)
        for name in ("kd", "mean_temperature", "teacher_student_kl"):
            value = getattr(out, name, None)
            if value is not None:
                self.log(f"train/{'kd_loss' if name == 'kd' else name}", value, **log)
        return out.total

    def _check_finite(self, out, alpha: float) -> None:
        """Stop before the backward pass and the optimizer step when the loss is NaN / inf on any rank.

        No step is taken with it, so no checkpoint ever holds the non-finite weights that would follow. Costs one
        device sync (and, with several ranks, one all-reduce of a flag) per micro-batch.
        """
        bad = not bool(torch.isfinite(out.total.detach()))
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            parts = f"lm {float(out.lm):.4g}" + ("" if out.kd is None else f", kd {float(out.kd):.4g}")
            raise NonFiniteLossError(
                f"the training loss is not finite after {self.global_step} optimizer steps ({parts}, "
                f"alpha {alpha:.3g}); stopped before the optimizer step, so no checkpoint holds non-finite weights. "
                "Check the teacher cache (`pd-lightning cache-info`), lower --model.lr or set "
                "--trainer.gradient_clip_val, then resume from the last good checkpoint (--ckpt_path)"
            )

    def optimizer_step(self, *args, **kwargs) -> None:
        """Lightning's step, then a check that the weights stayed finite (before any checkpoint of this step).

        A finite loss can still give a step that overflows the weights (a far too large learning rate, inf
        gradients); the check reads every parameter once per optimizer step (max-abs ``torch._foreach_norm``)
        and, with several ranks, all-reduces one flag. Under fp16 loss scaling a skipped step leaves the weights
        as they were.
        """
        super().optimizer_step(*args, **kwargs)
        params = [p for p in self.parameters() if p.numel() > 0]
        bad = bool(params) and not bool(torch.isfinite(torch.stack(torch._foreach_norm(params, math.inf)).max()))
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            raise NonFiniteLossError(
                f"optimizer step {self.global_step + 1} made the weights non-finite; stopped before saving "
                "them. Lower --model.lr or set --trainer.gradient_clip_val, then resume from the last good "
                "checkpoint (--ckpt_path)"
            )

    def on_train_batch_end(self, outputs, batch: dict[str, Tensor], batch_idx: int) -> None:
        # The logging window of train/ppl ends with the optimizer step whose values the loggers record.
        if not self.trainer.fit_loop._should_accumulate() and self.trainer._logger_connector.should_update_logs:
            self.train_lm_window.reset()

    @staticmethod
    def _lm_tokens(batch: dict[str, Tensor]) -> Tensor:
        return (batch["labels"] != -100).sum()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        out = self._loss(batch, 0.0)
        tokens = self._lm_tokens(batch)
        self.val_lm.update(out.lm, tokens)
        if self.token_byte_lengths is not None:
            if self.token_byte_lengths.device != batch["labels"].device:  # once per run, not per batch
                self.token_byte_lengths = self.token_byte_lengths.to(batch["labels"].device)
            self.val_bpb.update(out.lm.double() * tokens, target_bytes(batch["labels"], self.token_byte_lengths))

    def on_validation_epoch_end(self) -> None:
        """``val/loss`` = token-weighted mean LM loss over the whole validation set (all ranks); ``val/ppl`` = its
        exp; ``val/bpb`` = the validation set's nats / ln 2 / its target tokens' bytes (all ranks' sums, divided
        once). Logged once per validation run."""
        loss = self.val_lm.compute()  # sums over ranks
        self.val_lm.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", torch.exp(loss))
        if self.token_byte_lengths is not None:
            bpb = self.val_bpb.compute()  # sums over ranks
            self.val_bpb.reset()
            self.log("val/bpb", bpb)

    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end

    # ---- sharding: FSDP2 under Lightning's ModelParallelStrategy (configs/trainer/fsdp2.yaml) -------------------
    def configure_model(self) -> None:
        """``fully_shard`` (FSDP2) every transformer of this module when the strategy provides a device mesh
        (Lightning's ``ModelParallelStrategy``); nothing under any other strategy (DDP, FSDPStrategy wraps itself).

        Units: one per block, the untied output head on its own, then the root (embedding, final norm). The fused
        loss never calls the head's forward, so it sees the head sharded and gathers it once per step
        (``objective.full_head``: an all-gather, and a reduce-scatter of its gradient averaged over the ranks, as
        FSDP does for the other weights). pd-lightning has no tensor-parallel plan: the strategy's 2-D mesh
        ``(data_parallel, tensor_parallel)`` is used for HSDP -- shard within a ``tensor_parallel`` group (by default
        the devices of a node), replicate across the ``data_parallel`` groups (by default the nodes); a dimension of
        size 1 is dropped (plain FSDP). Every rank reads its own data (the data modules shard by global rank).
        """
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if mesh.ndim == 2 and 1 in mesh.shape:
            mesh = mesh[mesh.mesh_dim_names[0 if mesh.shape[1] == 1 else 1]]
        for model in (self.model, getattr(self, "teacher_model", None)):
            if model is None or isinstance(model, FSDPModule):  # configure_model may run again (fit, then test)
                continue
            for block in model.layers:
                fully_shard(block, mesh=mesh)
            if model.lm_head.weight is not model.embed.weight:
                fully_shard(model.lm_head, mesh=mesh)
            fully_shard(model, mesh=mesh)
        if getattr(self, "frozen_teacher", None) is not None:  # frozen, outside the checkpoint: sharded the same way
            self.frozen_teacher.shard(mesh)

    # ---- optimizer ----------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=self.betas, eps=self.eps)
        total = self.total_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.lr_schedule(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        data = self._trainer.datamodule if self._trainer is not None else None
        self._load_token_bytes(data)
        if self.frozen_teacher is not None or self.teacher_model is not None:
            self._check_online_teacher(data)
        elif stage == "fit" and data is not None and not getattr(data, "provides_teacher_targets", False):
            alphas = [self.alpha_at(s) for s in range(0, self.total_steps, max(1, self.total_steps // 1000))]
            if max(alphas, default=0.0) > 0:
                raise ValueError(
                    f"--model.alpha reaches {max(alphas):.3g} > 0 but --data ({type(data).__name__}) provides no "
                    "teacher targets: train from a logits cache (pd_lightning.cache.datamodule.CacheDataModule)"
                )

    def _load_token_bytes(self, data) -> None:
        """Bytes per token id for ``val/bpb``, from the data's tokenizer folder (once per run and folder). Without a
        tokenizer folder (data that names none, or one since moved) ``val/bpb`` is not logged, with a warning."""
        import sys
        from pathlib import Path

        folder = tokenizer_folder(data) if data is not None else None
        if folder is None:
            self.token_byte_lengths = None
            return
        if not Path(folder).is_dir():
            if self._trainer is None or self.trainer.is_global_zero:
                print(f"pd-lightning: warning: the data's tokenizer folder {folder} does not exist; val/bpb is not "
                      "logged", file=sys.stderr)  # fmt: skip
            self.token_byte_lengths = None
            return
        self.token_byte_lengths = byte_lengths(str(Path(folder).resolve()))

    def _check_online_teacher(self, data) -> None:
        """The in-step teacher reads the student's tokens (same vocabulary, same tokenizer), or, with another
        tokenizer (``teacher_cross_tokenizer``), the student's text through its own
        (``FrozenTeacher.use_tokenizers``)."""
        teacher = self.frozen_teacher
        if teacher is None:
            return
        where = f"--model.teacher {teacher.path!r}"
        data_fp = getattr(data, "tokenizer_fingerprint", None)
        teacher_fp = teacher.teacher.tokenizer_fingerprint
        if self.teacher_cross_tokenizer == "always" or (data_fp and teacher_fp and data_fp != teacher_fp):
            tokens = getattr(data, "tokens", None)
            teacher.use_tokenizers(
                tokenizer_folder(data) if data is not None else None, self.student_config.vocab_size,
                self.teacher_cross_tokenizer_rule, tokens if hasattr(tokens, "rows") else None,
            )  # fmt: skip
            return
        if teacher.vocab_size != self.student_config.vocab_size:
            raise ValueError(
                f"{where} has vocabulary {teacher.vocab_size}, the student's data has "
                f"{self.student_config.vocab_size}: use a teacher trained on the same tokenizer"
            )

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def _data_identity(self) -> dict:
        data = self._trainer.datamodule if self._trainer is not None else None
        if data is None or not hasattr(data, "tokenizer_fingerprint"):
            return {}
        identity = {"tokenizer_fingerprint": data.tokenizer_fingerprint, "seq_len": data.seq_len}
        tokenizer_path = getattr(data, "tokenizer_path", None)
        if tokenizer_path:  # lets `StudentLM.from_checkpoint` find the tokenizer without the run's config.yaml
            identity["tokenizer_path"] = str(tokenizer_path)
        return identity

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        window = [float(self.train_lm_window.total), float(self.train_lm_window.count)]
        checkpoint["pd_lightning"] = {
            "student_shape": self.student_config.shape(),
            **self._data_identity(),
            "train_lm_window": window,  # so a resumed run's first train/ppl covers the same steps
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.loaded_step = checkpoint.get("global_step")  # `validate` restores weights, not the trainer's step
        saved = checkpoint.get("pd_lightning", {})
        if "train_lm_window" in saved:
            total, count = saved["train_lm_window"]
            self.train_lm_window.total.fill_(total)
            self.train_lm_window.count.fill_(count)
        current = self.student_config.shape()
        if "student_shape" in saved and saved["student_shape"] != current:
            diff = {
                k: (saved["student_shape"].get(k), v) for k, v in current.items() if saved["student_shape"].get(k) != v
            }
            raise ValueError(
                "--ckpt_path: the checkpoint holds a student of a different shape than this run's "
                f"(field: (checkpoint, this run)) {diff}"
            )
        identity = self._data_identity()
        if (
            saved.get("tokenizer_fingerprint")
            and identity
            and saved["tokenizer_fingerprint"] != identity["tokenizer_fingerprint"]
        ):
            raise ValueError(
                f"--ckpt_path: the checkpoint was trained on tokenizer {saved['tokenizer_fingerprint']}, "
                f"--data uses tokenizer {identity['tokenizer_fingerprint']}"
            )
