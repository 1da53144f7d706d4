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
"""

from __future__ import annotations

import re
import warnings

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pd_lightning.data.cache_format import DEFAULT_SHARD_TOKENS, CacheSpec, token_source_fingerprint
from pd_lightning.data.cache_writer import BackgroundWriter, CacheWriter
from pd_lightning.data.corpus import TokenFile
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
    """

    def __init__(
        self,
        teacher: str,
        processor: LogitsProcessor,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        power_gammas: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.teacher_path, self.processor = teacher, processor
        self.power_gammas = tuple(float(g) for g in ([0.5] if power_gammas is None else power_gammas))
        if any(not g > 0 for g in self.power_gammas) or len(set(self.power_gammas)) != len(self.power_gammas):
            raise ValueError(f"--model.power_gammas must be distinct values > 0, got {list(self.power_gammas)}")
        self.teacher: Teacher = load_teacher(teacher, dtype, trust_remote_code)
        self.model = self.teacher.model  # registered, so Lightning moves it to the device
        self.model.requires_grad_(False)

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

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict | None:
        tokens = batch["tokens"]  # (B, L + 1)
        seq_index = batch["sequence_index"]  # (B,)
        L_ = tokens.shape[1] - 1
        logits = self.model(tokens[:, :-1])  # (B, L, V)
        real = seq_index >= 0  # padding rows of a sharded teacher's lockstep (CacheWriterCallback) have index -1
        if not bool(real.all()):
            if not bool(real.any()):
                return None
            tokens, seq_index, logits = tokens[real], seq_index[real], logits[real.to(logits.device)]
        try:
            target = self.processor(logits, position_keys(seq_index, L_), gammas=self.power_gammas)
        except ValueError as e:
            m = re.search(r"at row (\d+)", str(e))
            if not m:
                raise
            row = int(m.group(1))
            seq, pos = int(seq_index[row // L_]), row % L_
            raise ValueError(
                f"teacher {self.teacher_path!r} produced NaN/Inf logits at sequence {seq}, position {pos}"
            ) from None
        # The target stays on the device: the writer thread compacts it there (only kept entries cross to host).
        return {"sequence_index": seq_index.cpu(), "tokens": tokens.cpu(), "target": target}


def _lockstep_padding(trainer: L.Trainer, pending: int, batch_size: int) -> int:
    """Rows of padding this rank's loader appends so that every rank runs as many teacher forwards as the busiest.

    Only with a sharded teacher (``ModelParallelStrategy``): each of its forwards all-gathers the layers on every
    rank, so a rank that ran out of sequences must keep calling it. Padding rows have ``sequence_index`` -1; the
    forward runs on them and ``predict_step`` drops them. 0 under any other strategy.
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    if trainer.world_size == 1 or not isinstance(trainer.strategy, ModelParallelStrategy):
        return 0
    import torch.distributed as dist

    batches = -(-pending // batch_size)
    most = torch.tensor(batches, device=trainer.strategy.root_device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return 0 if batches == int(most) else int(most) * batch_size - pending


class CacheWriterCallback(L.Callback):
    """Writes the predictions into ``output`` in bounded shards, from a background thread.

    Args:
        output: the cache folder.
        overwrite: replace another cache found in ``output`` (refused otherwise).
        shard_tokens: positions per shard (whole sequences; the work a kill can lose). Default 2^23, about 1.3 GB
            at the paper's ~150 B/token.
        max_pending: batches queued for the writer thread before the teacher waits.
    """

    def __init__(
        self, output: str, overwrite: bool = False, shard_tokens: int = DEFAULT_SHARD_TOKENS, max_pending: int = 4
    ) -> None:
        if shard_tokens < 1:
            raise ValueError(f"--writer.shard_tokens must be >= 1, got {shard_tokens}")
        self.output, self.overwrite = output, overwrite
        self.shard_tokens, self.max_pending = shard_tokens, max_pending
        self.writer: BackgroundWriter | None = None

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
        if teacher.tokenizer_fingerprint is not None and teacher.tokenizer_fingerprint != data.tokens.fingerprint:
            raise ValueError(
                f"--data.path {data.path!r} was tokenized with tokenizer {data.tokens.fingerprint}, but the teacher "
                f"{pl_module.teacher_path!r} uses tokenizer {teacher.tokenizer_fingerprint}: prepare the token file "
                "with --tokenizer <the teacher's folder>"
            )
        if data.tokens.vocab_size > teacher.vocab_size:
            raise ValueError(
                f"--data.path {data.path!r} has vocabulary {data.tokens.vocab_size} > "
                f"the teacher's {teacher.vocab_size}"
            )
        spec = CacheSpec.for_processor(
            pl_module.processor,
            vocab_size=teacher.vocab_size,
            seq_len=data.tokens.seq_len,
            num_sequences=data.num_sequences,
            teacher_fingerprint=teacher.fingerprint,
            tokenizer_fingerprint=data.tokens.fingerprint,
            source_fingerprint=token_source_fingerprint(data.path, data.split),
            shard_tokens=self.shard_tokens,
            power_gammas=pl_module.power_gammas,
        )
        # Constructing the writer applies the refusals and, when nothing is left (a rerun after a kill past the
        # last shard), writes the final index: the cache is finished even though the predict loop will not run.
        writer = CacheWriter(
            self.output, spec, rank=trainer.global_rank, world_size=trainer.world_size, overwrite=self.overwrite
        )
        data.pending = writer.pending_sequences
        data.padding = _lockstep_padding(trainer, len(data.pending), data.batch_size)
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

    def on_predict_batch_end(self, trainer, pl_module, outputs: dict, batch, batch_idx: int, dataloader_idx=0) -> None:
        if outputs is not None:  # None: a batch of lockstep padding only
            self.writer.write(outputs["sequence_index"], outputs["tokens"], outputs["target"])

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.writer is not None:
            path = self.writer.finalize()
            self.writer = None
            print(f"wrote {path}")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # An empty predict loop (nothing pending on this rank) never calls on_predict_end: stop the thread here.
        if self.writer is not None and stage == "predict":
            writer, self.writer = self.writer, None
            if writer.complete:  # finished before this run ("already complete; nothing to do"): nothing to rewrite
                writer.close()
            elif not len(writer.pending_sequences):
                print(f"wrote {writer.finalize()}")
            else:
                writer.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.writer is not None:
            try:
                self.writer.close()  # drop the partly written shard; a rerun writes it again
            finally:
                self.writer = None
