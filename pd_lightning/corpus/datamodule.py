"""Lightning data modules: packed token files (LM pre-training) and, in ``cache_datamodule.py``, teacher caches.

Both share ``SequenceDataModule``: batching, workers, the resumable sampler and its checkpointed position, and
the runtime values (``vocab_size``, ``tokenizer_fingerprint``, ``seq_len``) that LightningCLI links into the model.
"""

from __future__ import annotations

import os
from abc import abstractmethod

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pd_lightning.corpus.prepare import TokenFile
from pd_lightning.corpus.sampler import ResumableSampler

DEFAULT_DATA_SEED = 1234  # the shuffle seed when neither --data.seed nor --seed_everything gives one


class TokenDataset(Dataset):
    """Rows of one split of a token file as ``{"input_ids": (L,), "labels": (L,)}`` int64 tensors."""

    def __init__(self, tokens: TokenFile, split: str, limit: int | None = None) -> None:
        self.tokens, self.split = tokens, split
        n = tokens.lengths[split]
        self.n = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = torch.from_numpy(self.tokens.rows(self.split, i).astype(np.int64))
        # sequence_index: the row's index in the split (the online logit recorder and Sampled's keys use it)
        return {"input_ids": row[:-1], "labels": row[1:], "sequence_index": torch.tensor(i)}


class SequenceDataModule(L.LightningDataModule):
    """Shared batching and resumable position. Subclasses build the datasets.

    Args:
        batch_size: sequences per batch per rank.
        num_workers: DataLoader worker processes per rank.
        seed: seed of the per-epoch shuffle (epoch e uses seed + e); None (default) = the run's ``--seed_everything``
            (Lightning's global seed, ``PL_GLOBAL_SEED``; 1234 without one), so changing ``--seed_everything`` changes
            the data order too unless ``--data.seed`` is given. The seed used is stored in checkpoints and a resumed
            run keeps it, whatever its ``--seed_everything``.
        shuffle: shuffle training sequences each epoch.
        val_sequences: cap on validation sequences (None = all of them).
    """

    def __init__(
        self,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int | None = None,
        shuffle: bool = True,
        val_sequences: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"--data.batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {num_workers}")
        self.batch_size, self.num_workers, self.seed, self.shuffle = batch_size, num_workers, seed, shuffle
        self.val_sequences = val_sequences
        self._sampler: ResumableSampler | None = None
        self._resume: dict | None = None
        self._resumed_seed: int | None = None

    @property
    def data_seed(self) -> int:
        """The shuffle seed in use: a resumed run's checkpointed one, else ``--data.seed``, else the global seed."""
        if self._resumed_seed is not None:
            return self._resumed_seed
        if self.seed is not None:
            return self.seed
        return int(os.environ.get("PL_GLOBAL_SEED", DEFAULT_DATA_SEED))

    # Runtime values linked into the model (see cli.py).
    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def tokenizer_fingerprint(self) -> str: ...

    @property
    @abstractmethod
    def seq_len(self) -> int: ...

    @property
    def provides_teacher_targets(self) -> bool:
        return False

    @abstractmethod
    def train_dataset(self) -> Dataset: ...

    @abstractmethod
    def val_dataset(self) -> Dataset | None: ...

    def setup(self, stage: str) -> None:
        """``fit`` with validation configured (``--trainer.limit_val_batches`` not 0) refuses data without validation
        sequences: Lightning would silently never validate."""
        trainer = self.trainer
        if stage != "fit" or trainer is None or trainer.limit_val_batches == 0:
            return
        dataset = self.val_dataset()
        if dataset is not None and len(dataset) > 0:
            return
        raise ValueError(
            f"fit: validation is configured but there is no validation data: {self._no_validation_reason()}; "
            "or pass --trainer.limit_val_batches 0 to train without validation"
        )

    def _no_validation_reason(self) -> str:
        if self.val_sequences == 0:
            return "--data.val_sequences is 0 (set it to a positive number, or leave it unset for all)"
        if hasattr(self, "val_file") and self.val_file is None:
            return "--data.val_tokens is not set (give the token file whose val part scores the model)"
        tokens = getattr(self, "val_file", None) or getattr(self, "tokens", None)
        where = f" {str(tokens.path)!r}" if tokens is not None else ""
        return f"the token file{where} has no validation part (run `pd-lightning prepare` with --val_fraction > 0)"

    def _loader(self, dataset: Dataset, sampler) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            drop_last=sampler is not None,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if len(dataset) < self.batch_size * world:
            raise ValueError(
                f"--data.batch_size {self.batch_size} x {world} ranks exceeds the {len(dataset)} training sequences"
            )
        self._sampler = ResumableSampler(len(dataset), self.shuffle, self.data_seed, rank, world)
        if self._resume is not None:
            self._sampler.resume(self._resume["epoch"], self._resume["consumed"])
            self._resume = None
        return self._loader(dataset, self._sampler)

    def val_dataloader(self) -> DataLoader | list:
        dataset = self.val_dataset()
        if dataset is None or len(dataset) == 0:
            return []
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        if world > 1 and len(dataset) >= world:
            sampler = ResumableSampler(len(dataset), False, 0, rank, world)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers)

    def state_dict(self) -> dict:
        """The training position: epoch and samples this rank consumed in it (batches whose step ran)."""
        if self.trainer is None:
            return {}
        processed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "consumed": processed * self.batch_size, "seed": self.data_seed}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        saved = state.get("seed")
        if saved is not None and self.seed is not None and self.seed != saved:
            raise ValueError(
                f"--data.seed {self.seed} differs from the checkpoint's data seed {saved}: a resumed run keeps its "
                f"data order; drop --data.seed or set it to {saved}"
            )
        self._resumed_seed = saved
        self._resume = dict(state)


class TokenDataModule(SequenceDataModule):
    """LM pre-training data from a token file written by ``pd-lightning prepare``.

    Args:
        path: the token file (HDF5).
    """

    def __init__(self, path: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.tokens = TokenFile(path, flag="--data.path")

    @property
    def vocab_size(self) -> int:
        return self.tokens.vocab_size

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.tokens.fingerprint

    @property
    def seq_len(self) -> int:
        return self.tokens.seq_len

    @property
    def tokenizer_path(self) -> str:
        return self.tokens.tokenizer_path

    def train_dataset(self) -> Dataset:
        return TokenDataset(self.tokens, "train")

    def val_dataset(self) -> Dataset | None:
        return TokenDataset(self.tokens, "val", self.val_sequences)
