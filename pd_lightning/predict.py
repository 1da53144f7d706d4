"""``pd-lightning predict``: stream a token file through a teacher and write its truncated logits to an HDF5 cache.

Pieces (all LightningCLI plug-ins):
- ``TokenSequences``: the data module; yields the sequences this rank still has to write (resume skips the rest).
- ``TeacherLogits``: the LightningModule; teacher forward + ``LogitsProcessor`` per batch.
- ``CacheWriterCallback``: each rank writes its bounded shards (``--writer.shard_tokens``) once, in a background
  thread so the teacher never waits on disk; each finished shard is renamed into place and indexed, so a kill loses
  at most the shard being written and a rerun continues from the finished ones (see ``cache_writer.py``).

A teacher too large for one device is sharded across the ranks under ``ModelParallelStrategy``
(``TeacherLogits.configure_model``, FSDP2); each rank still predicts its own shards, in lockstep.

Each rank's data loader holds exactly the sequences of that rank's unfinished shards, so the trainer must not
shard them again: ``use_distributed_sampler`` is off in ``PredictCLI``'s defaults and refused when set.

Faults (``CacheWriterCallback``):
- One run per folder: the run's ranks hold a lock in the folder (``cache_writer.WriterLock``, rank 0 first); a
  second ``predict`` on the same folder is refused in one line (exit 2) before anything is written.
- Lockstep: with several ranks every rank runs as many batches as the busiest (padding rows, ``sequence_index``
  -1; a rank without a shard idles through them), and before each batch the ranks agree, through one small
  all-reduce, whether to stop: SIGTERM (exit 143), SIGINT / Ctrl-C (exit 130) or a writer error (a full disk; exit
  2, one line from rank 0). So every rank stops at the same batch and none is left waiting in a collective of a
  sharded teacher; the finished shards stay and a rerun resumes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
import warnings
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pd_lightning.cache.format import (
    DEFAULT_SHARD_TOKENS,
    SCHEMA_VERSION,
    CacheSpec,
    check_schema,
    token_source_fingerprint,
)
from pd_lightning.cache.writer import BackgroundWriter, CacheWriter, WriterLock
from pd_lightning.corpus.prepare import TokenFile
from pd_lightning.distill.processors import LogitsProcessor, position_keys
from pd_lightning.teacher import Teacher, load_teacher


class _Rows(Dataset):
    """The rows ``indices`` of a split, then ``padding`` rows of zeros with ``sequence_index`` -1 (lockstep)."""

    def __init__(self, tokens: TokenFile, split: str, indices: np.ndarray, padding: int = 0) -> None:
        self.tokens, self.split, self.indices, self.padding = tokens, split, indices, padding

    def __len__(self) -> int:
        return len(self.indices) + self.padding

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if i >= len(self.indices):
            return {
                "sequence_index": torch.tensor(-1),
                "tokens": torch.zeros(self.tokens.seq_len + 1, dtype=torch.int64),
            }
        index = int(self.indices[i])
        row = self.tokens.rows(self.split, index).astype(np.int64)
        return {"sequence_index": torch.tensor(index), "tokens": torch.from_numpy(row)}


class TokenSequences(L.LightningDataModule):
    """Sequences of a token file to run through the teacher.

    Args:
        path: the token file written by ``pd-lightning prepare``.
        split: which part to cache (train or val).
        batch_size: sequences per teacher forward pass.
        num_workers: DataLoader workers.
    """

    def __init__(self, path: str, split: str = "train", batch_size: int = 8, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"--data.batch_size must be positive, got {batch_size}")
        self.tokens = TokenFile(path, flag="--data.path")
        if split not in ("train", "val"):
            raise ValueError(f"--data.split must be train or val, got {split!r}")
        if self.tokens.lengths[split] == 0:
            raise ValueError(f"--data.split {split!r}: the token file {path!r} holds no {split} sequences")
        self.path, self.split, self.batch_size, self.num_workers = path, split, batch_size, num_workers
        self.pending: np.ndarray | None = None  # set by CacheWriterCallback.setup
        self.padding = 0  # lockstep padding rows of a sharded teacher (set by CacheWriterCallback.setup)

    @property
    def num_sequences(self) -> int:
        return self.tokens.lengths[self.split]

    def predict_dataloader(self) -> DataLoader:
        if self.pending is None:
            raise ValueError("pd-lightning predict needs the cache writer (--writer.output)")
        return DataLoader(
            _Rows(self.tokens, self.split, self.pending, self.padding),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )


class TeacherLogits(L.LightningModule):
    """Runs the teacher and its logits processor.

    Args:
        teacher: a local Hugging Face causal-LM folder or a pd-lightning ``.ckpt``.
        processor: how to truncate the teacher's distribution (TopPK, Sampled, Full).
        dtype: the teacher's weights dtype (float32, bfloat16, float16).
        trust_remote_code: let transformers run the folder's own modelling code (off unless you set it).
        power_gammas: gammas for which WTTM's per-token weight ``U_gamma = sum_v p_v^gamma`` is computed from the
            full distribution and stored (2 B per position each; default the WTTM default gamma 0.5; ``[]``: none).
        cross_tokenizer: ``auto`` (default): a teacher whose tokenizer differs from the token file's (fingerprints)
            reads the student's text through its own tokenizer, and its targets are aligned and mapped onto the
            student's ids (README "Cross-tokenizer distillation"); a teacher with the student's tokenizer reads the
            student's ids. ``always``: align and map even when the tokenizers are equal (an exactness check; rows
            whose text re-tokenizes differently at their cut ends lose those positions).
        cross_tokenizer_rule: where a teacher token's probability goes when no student token has its bytes:
            ``tail`` (default: into the tail mass, which the tail-bucket losses match and the others renormalise
            away) or ``prefix`` (to the longest student token that is a byte prefix of it). Recorded in the cache.
    """

    def __init__(
        self,
        teacher: str,
        processor: LogitsProcessor,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        power_gammas: list[float] | None = None,
        cross_tokenizer: Literal["auto", "always"] = "auto",
        cross_tokenizer_rule: Literal["tail", "prefix"] = "tail",
    ) -> None:
        super().__init__()
        from pd_lightning.crosstok.pair import check_rule

        if cross_tokenizer not in ("auto", "always"):
            raise ValueError(f"--model.cross_tokenizer must be auto or always, got {cross_tokenizer!r}")
        self.cross_tokenizer = cross_tokenizer
        self.cross_tokenizer_rule = check_rule(cross_tokenizer_rule, "--model.cross_tokenizer_rule")
        self.pair = None  # a crosstok.pair.TokenizerPair when the teacher reads its own tokens (use_tokenizers)
        self.teacher_path, self.processor = teacher, processor
        self.power_gammas = tuple(float(g) for g in ([0.5] if power_gammas is None else power_gammas))
        if any(not g > 0 for g in self.power_gammas) or len(set(self.power_gammas)) != len(self.power_gammas):
            raise ValueError(f"--model.power_gammas must be distinct values > 0, got {list(self.power_gammas)}")
        self.teacher: Teacher = load_teacher(teacher, dtype, trust_remote_code)
        self.model = self.teacher.model  # registered, so Lightning moves it to the device
        self.model.requires_grad_(False)
        # A batch of lockstep padding only skips the forward, unless the teacher is sharded (its forward is a
        # collective every rank must join). Set by CacheWriterCallback.setup.
        self.skip_padding_forward = False

    def configure_model(self) -> None:
        """A teacher sharded across the ranks under Lightning's ``ModelParallelStrategy``
        (``--config configs/trainer/fsdp2.yaml``): FSDP2 ``fully_shard`` of each decoder layer, then the root, so a
        teacher too large for one device is held 1/N per rank; each rank still predicts its own sequences, gathering
        one layer at a time. The strategy's 2-D mesh is used as in ``DistillationModule.configure_model`` (sharded
        within a node, replicated across nodes). Nothing under any other strategy.
        """
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        if mesh.ndim == 2 and 1 in mesh.shape:
            mesh = mesh[mesh.mesh_dim_names[0 if mesh.shape[1] == 1 else 1]]
        inner = getattr(self.model, "model", self.model)  # HF: LlamaForCausalLM.model.layers; ours: .layers
        for layer in getattr(inner, "layers", []):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def teacher_tokenizer_folder(self) -> str | None:
        """The teacher's tokenizer folder: the HF folder itself, or the one a pd-lightning checkpoint records."""
        from pathlib import Path

        return self.teacher_path if Path(self.teacher_path).is_dir() else self.teacher.tokenizer_path

    def use_tokenizers(self, tokens: TokenFile, split: str, data_flag: str = "--data.path") -> None:
        """Read the student's text through the teacher's own tokenizer (``cross_tokenizer``): load both tokenizers,
        build the vocabulary map, and refuse tokenizers that do not round-trip the text of the split's first rows
        (one line naming the flag and the row)."""
        from pd_lightning.crosstok.pair import CHECK_ROWS, TokenizerPair

        student_flag, teacher_flag = f"{data_flag} {str(tokens.path)!r}", f"--model.teacher {self.teacher_path!r}"
        self.pair = TokenizerPair.load(
            tokens.tokenizer_path, tokens.vocab_size, self.teacher_tokenizer_folder(), self.teacher.vocab_size,
            self.cross_tokenizer_rule, student_flag=student_flag, teacher_flag=teacher_flag,
            rule_flag="--model.cross_tokenizer_rule", teacher_fingerprint=self.teacher.tokenizer_fingerprint,
        )  # fmt: skip
        rows = tokens.rows(split, slice(0, min(CHECK_ROWS, tokens.lengths[split]))).tolist()
        self.pair.check_round_trip(rows, student_flag, teacher_flag, what=f"{split} sequence")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict | None:
        tokens = batch["tokens"]  # (B, L + 1)
        seq_index = batch["sequence_index"]  # (B,)
        L_ = tokens.shape[1] - 1
        if self.skip_padding_forward and not bool((seq_index >= 0).any()):
            return None  # an idle rank's lockstep batch (CacheWriterCallback)
        if self.pair is not None:
            return self._cross_tokenizer_step(tokens, seq_index)
        logits = self.model(tokens[:, :-1])  # (B, L, V)
        real = seq_index >= 0  # lockstep padding rows (CacheWriterCallback) have index -1
        if not bool(real.all()):
            if not bool(real.any()):
                return None
            tokens, seq_index, logits = tokens[real], seq_index[real], logits[real.to(logits.device)]
        try:
            target = self.processor(logits, position_keys(seq_index, L_), gammas=self.power_gammas)
        except ValueError as e:
            raise self._named_row(e, seq_index, L_) from None
        # The target stays on the device: the writer thread compacts it there (only kept entries cross to host).
        return {"sequence_index": seq_index.cpu(), "tokens": tokens.cpu(), "target": target}

    def _cross_tokenizer_step(self, tokens: Tensor, seq_index: Tensor) -> dict | None:
        """``predict_step`` for a teacher with its own tokenizer (``crosstok.pair``): align each row's text with the
        teacher's tokenization, run the teacher over that, map its targets onto the student's positions and ids."""
        L_ = tokens.shape[1] - 1
        real = seq_index >= 0
        if not bool(real.any()):
            self.model(tokens[:, :-1])  # a sharded teacher's lockstep batch: join its collectives
            return None
        tokens, seq_index = tokens[real], seq_index[real]
        try:
            ids, positions = self.pair.teacher_batch(tokens.tolist(), L_, [f"sequence {int(s)}" for s in seq_index])
        except ValueError as e:
            raise ValueError(f"--model.teacher {self.teacher_path!r}: {e}") from None
        logits = self.model(ids.to(self.device))  # (B, T, V_t)
        try:
            mapped = self.pair.targets(logits, positions, self.processor, position_keys(seq_index, L_),
                                       self.power_gammas)  # fmt: skip
        except ValueError as e:
            raise self._named_row(e, seq_index, L_) from None
        return {"sequence_index": seq_index.cpu(), "tokens": tokens.cpu(), "target": mapped.target}

    def _named_row(self, err: ValueError, seq_index: Tensor, length: int) -> ValueError:
        """The processor's refusal of non-finite logits ("at row N") as the sequence and position it is."""
        m = re.search(r"at row (\d+)", str(err))
        if not m:
            return err
        row = int(m.group(1))
        seq, pos = int(seq_index[row // length]), row % length
        return ValueError(f"teacher {self.teacher_path!r} produced NaN/Inf logits at sequence {seq}, position {pos}")


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()  # signal handlers can only be set there


def _lockstep_padding(trainer: L.Trainer, pending: int, batch_size: int) -> int:
    """Rows of padding this rank's loader appends so that every rank runs as many batches as the busiest.

    With several ranks, every batch starts with the ranks' stop agreement (an all-reduce, ``CacheWriterCallback``),
    and a sharded teacher's forward all-gathers the layers on every rank: a rank that ran out of sequences (or had
    none: more ranks than shards) must keep joining both. Padding rows have ``sequence_index`` -1; ``predict_step``
    drops them, and skips the forward of a batch of padding only unless the teacher is sharded. 0 on one rank.
    """
    if trainer.world_size == 1:
        return 0
    import torch.distributed as dist

    batches = -(-pending // batch_size)
    most = torch.tensor(batches, device=trainer.strategy.root_device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return 0 if batches == int(most) else int(most) * batch_size - pending


EXIT_SIGTERM, EXIT_SIGINT = 143, 130  # 128 + the signal: what a shell reports for a process stopped by it
_STOP_SIGINT, _STOP_SIGTERM, _STOP_ERROR = 1, 2, 3  # the agreed stop reason (all-reduced with MAX: an error wins)


class PredictStopped(SystemExit):
    """A predict run stopped before its end by a signal, on every rank at the same batch (exit 143 / 130)."""


def _all_reduce_max(trainer: L.Trainer, value: int) -> int:
    if trainer.world_size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor(value, device=trainer.strategy.root_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _all_gather_object(trainer: L.Trainer, obj: object) -> list:
    if trainer.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * trainer.world_size
    dist.all_gather_object(out, obj)
    return out


def _portable(err: BaseException) -> BaseException:
    """``err`` as it can travel to rank 0 (pickled): its text and, for an OS error, its errno and file."""
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, err.strerror, err.filename)
    try:
        import pickle

        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001 - not picklable: its message
        return RuntimeError(f"{type(err).__name__}: {err}")


class CacheWriterCallback(L.Callback):
    """Writes the predictions into ``output`` in bounded shards, from a background thread.

    Args:
        output: the cache folder.
        overwrite: replace another cache found in ``output`` (refused otherwise).
        shard_tokens: positions per shard (whole sequences; the work a kill can lose). Default 2^23, about 1.3 GB
            at the paper's ~150 B/token.
        max_pending: batches queued for the writer thread before the teacher waits.
        schema: the cache format: 3 (default; ~2.2 B per stored entry at a 151k vocabulary) or 2 (4 B per entry, read
            by pd-lightning before schema 3). Both hold the same values.
    """

    def __init__(
        self,
        output: str,
        overwrite: bool = False,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        max_pending: int = 4,
        schema: Literal[2, 3] = SCHEMA_VERSION,
    ) -> None:
        if shard_tokens < 1:
            raise ValueError(f"--writer.shard_tokens must be >= 1, got {shard_tokens}")
        self.schema = check_schema(schema)
        self.output, self.overwrite = output, overwrite
        self.shard_tokens, self.max_pending = shard_tokens, max_pending
        self.writer: BackgroundWriter | None = None
        self.lock: WriterLock | None = None
        self._launcher_pid: int | None = None  # rank 0's pid (Lightning's DDP launcher starts the other ranks)
        self._signal: int | None = None  # the first SIGTERM / SIGINT received
        self._handlers: dict[int, object] = {}  # the handlers ours replaced

    # ----------------------------------------------------------------------------------------- one run per folder
    def _lock(self, trainer: L.Trainer) -> None:
        """Rank 0 takes the folder's lock, tells the others (with its pid), then they join it: before anything is
        written. A refusal is raised by rank 0 (one line); the other ranks exit with the same code, quietly."""
        self.lock = WriterLock(self.output)
        ok = self.lock.acquire() if trainer.global_rank == 0 else False
        ok, launcher = trainer.strategy.broadcast((ok, (socket.gethostname(), os.getpid())), src=0)
        self._launcher_pid = launcher[1] if launcher[0] == socket.gethostname() else None
        if ok and trainer.global_rank != 0:
            ok = self.lock.join()
        if trainer.world_size > 1:
            ok = _all_reduce_max(trainer, 0 if ok else 1) == 0
        if not ok:
            refusal = self.lock.refusal()
            self.lock.release()
            self._exit(trainer, refusal, 2)

    def _exit(self, trainer: L.Trainer, err: BaseException | None, code: int) -> None:
        """Leave the run on every rank together: rank 0 raises ``err`` (reported in one line; ``None``: a
        ``PredictStopped(code)``), the other ranks exit ``code`` without a word, after rank 0 when it launched them
        (Lightning's DDP launcher kills rank 0 when one of its ranks ends with a non-zero code before it)."""
        if trainer.global_rank == 0:
            raise err if err is not None else PredictStopped(code)
        if self._launcher_pid is not None and os.getppid() == self._launcher_pid:
            deadline = time.monotonic() + 60
            while os.getppid() == self._launcher_pid and time.monotonic() < deadline:
                time.sleep(0.05)
        raise PredictStopped(code) if err is None else SystemExit(code)

    # ----------------------------------------------------------------------------------------- signals
    def _on_signal(self, signum: int, frame) -> None:
        if self._signal is None:
            self._signal = signum
        if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once (a run that does not reach its next batch)
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def _install_signals(self) -> None:
        if threading_main():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._handlers.setdefault(signum, signal.getsignal(signum))
                signal.signal(signum, self._on_signal)

    def _restore_signals(self) -> None:
        if threading_main():
            for signum, handler in self._handlers.items():
                signal.signal(signum, handler)
        self._handlers = {}

    def _stop_reason(self, trainer: L.Trainer, signals: bool) -> int:
        if self.writer is not None and self.writer.error is not None:
            return _STOP_ERROR
        if not signals:
            return 0
        if self._signal == signal.SIGTERM or trainer.received_sigterm:  # Lightning's handler, before ours was set
            return _STOP_SIGTERM
        return _STOP_SIGINT if self._signal == signal.SIGINT else 0

    def _agree(self, trainer: L.Trainer, where: str, signals: bool = True) -> None:
        """All ranks, at the same point: stop together if any rank got a signal (``signals``) or a writer error."""
        reason = _all_reduce_max(trainer, self._stop_reason(trainer, signals))
        if not reason:
            return
        writer, self.writer = self.writer, None
        error = writer.error if writer is not None else None
        if writer is not None:
            writer.close(raise_error=False)  # writes what is queued, drops the partly written shard
        self._release()
        if reason == _STOP_ERROR:
            errors = _all_gather_object(trainer, None if error is None else _portable(error))
            self._exit(trainer, self._named(next(e for e in errors if e is not None)), 2)
        how, code = ("SIGTERM", EXIT_SIGTERM) if reason == _STOP_SIGTERM else ("SIGINT (Ctrl-C)", EXIT_SIGINT)
        if trainer.global_rank == 0:
            print(
                f"pd-lightning: predict stopped by {how} {where}, before the end; the finished shards in {self.output} "
                f"are kept: rerun the same command to resume (exit code {code})",
                file=sys.stderr,
                flush=True,
            )
        self._exit(trainer, None, code)

    def _named(self, err: BaseException) -> BaseException:
        """A write error (a full disk) as one line naming the flag and the file."""
        from pd_lightning.paths import describe_os_error

        described = describe_os_error(err) if isinstance(err, OSError) else None
        return err if described is None else ValueError(f"--writer.output {self.output}: {described}")

    def _release(self) -> None:
        self._restore_signals()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ----------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise ValueError(
                "pd-lightning predict gives each rank its own sequences; a distributed sampler on top would skip "
                "most of them: pass --trainer.use_distributed_sampler false (the default)"
            )
        data: TokenSequences = trainer.datamodule
        teacher: Teacher = pl_module.teacher
        cross = pl_module.cross_tokenizer == "always" or (
            teacher.tokenizer_fingerprint is not None and teacher.tokenizer_fingerprint != data.tokens.fingerprint
        )
        teacher_tokenizer, vocab = "", teacher.vocab_size
        if cross:  # the teacher reads the text with its own tokenizer; the cache holds student ids
            from pd_lightning.corpus.tokenizer import tokenizer_fingerprint

            pl_module.use_tokenizers(data.tokens, data.split)
            teacher_tokenizer, vocab = tokenizer_fingerprint(pl_module.pair.teacher_tok), data.tokens.vocab_size
        elif data.tokens.vocab_size > teacher.vocab_size:
            raise ValueError(
                f"--data.path {data.path!r} has vocabulary {data.tokens.vocab_size} > "
                f"the teacher's {teacher.vocab_size}"
            )
        spec = CacheSpec.for_processor(
            pl_module.processor,
            vocab_size=vocab,
            seq_len=data.tokens.seq_len,
            num_sequences=data.num_sequences,
            teacher_fingerprint=teacher.fingerprint,
            tokenizer_fingerprint=data.tokens.fingerprint,
            source_fingerprint=token_source_fingerprint(data.path, data.split),
            shard_tokens=self.shard_tokens,
            power_gammas=pl_module.power_gammas,
            teacher_tokenizer_fingerprint=teacher_tokenizer,
            vocab_map_rule=pl_module.cross_tokenizer_rule if cross else "",
        )
        self._lock(trainer)  # before anything is written in the folder
        # Constructing the writer applies the refusals and, when nothing is left (a rerun after a kill past the
        # last shard), writes the final index: the cache is finished even though the predict loop will not run.
        writer = CacheWriter(
            self.output,
            spec,
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            overwrite=self.overwrite,
            schema=self.schema,
        )
        data.pending = writer.pending_sequences
        data.padding = _lockstep_padding(trainer, len(data.pending), data.batch_size)
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        pl_module.skip_padding_forward = type(trainer.strategy) in (DDPStrategy, SingleDeviceStrategy)
        ranges = [spec.shard_range(int(j)) for j in spec.rank_shards(trainer.global_rank, trainer.world_size)]
        mine = sum(b - a for a, b in ranges)
        if not len(data.pending):  # said in our own line below / by the other ranks' progress, not as a warning
            warnings.filterwarnings("ignore", message=r"Total length of `DataLoader` across ranks is zero")
        if writer.complete:
            print(f"{self.output} is already complete; nothing to do")
        elif len(data.pending) < mine:
            print(f"resuming {self.output}: {mine - len(data.pending)} sequences already written, "
                  f"{len(data.pending)} to go")  # fmt: skip
        self.writer = BackgroundWriter(writer, max_pending=self.max_pending)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install_signals()  # here: after Lightning's own SIGTERM handler (set after setup), which ours replaces

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx=0) -> None:
        total = trainer.num_predict_batches[dataloader_idx] if trainer.num_predict_batches else "?"
        self._agree(trainer, f"at batch {batch_idx + 1} of {total}")

    def on_predict_batch_end(self, trainer, pl_module, outputs: dict, batch, batch_idx: int, dataloader_idx=0) -> None:
        if outputs is not None:  # None: a batch of lockstep padding only
            # A writer error is not raised here but agreed on before the next batch (or at the end), by all ranks.
            self.writer.write(outputs["sequence_index"], outputs["tokens"], outputs["target"], raise_error=False)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.writer is not None:
            self.writer.wait()  # a write error of the last batches is agreed on like any other
            self._agree(trainer, "after the last batch", signals=False)  # every batch is in: finish the cache
            path = self.writer.finalize()
            self.writer = None
            print(f"wrote {path}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # An empty predict loop (nothing pending on this rank) never calls on_predict_end: stop the thread here.
        if stage != "predict":
            return
        try:
            if self.writer is not None:
                writer, self.writer = self.writer, None
                if writer.complete:  # finished before this run ("already complete; nothing to do"): nothing to rewrite
                    writer.close()
                elif not len(writer.pending_sequences):
                    print(f"wrote {writer.finalize()}")
                else:
                    writer.close()
        finally:
            self._release()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            if self.writer is not None:
                # Drop the partly written shard; a rerun writes it again. A writer error is the exception itself
                # or was reported by rank 0 already: not raised again here.
                self.writer.close(raise_error=False)
        finally:
            self.writer = None
            self._release()
