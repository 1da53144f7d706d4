"""Training data from a teacher-logit cache: tokens + sparse teacher targets per position."""

from __future__ import annotations

import sys

from torch.utils.data import Dataset

from pd_lightning.data.cache_reader import TeacherCache
from pd_lightning.data.corpus import TokenFile
from pd_lightning.data.datamodule import SequenceDataModule, TokenDataset


class CacheDataModule(SequenceDataModule):
    """Batches of ``input_ids``, ``labels`` and the teacher's sparse targets (``teacher_ids``, ``teacher_logprobs``
    (B, T, K), ``teacher_std``, ``teacher_entropy`` (B, T)) read from a cache written by ``pd-lightning predict``.

    The student's vocabulary is linked to the cache's (the teacher's logits width), so every cached id is valid.
    Any number of ranks, workers and any batch size read any cache, whatever the number of writer ranks: the
    training set is the cache's finished sequences, and the rank-aware sampler gives each reader rank its share.
    Every shard's header is checked here, in the main process, so a damaged cache is refused with one line before
    any worker starts; errors that only reading finds (a failed fletcher32 checksum, a non-finite statistic) reach
    the user as one line too (see ``CacheError``).

    Args:
        path: the cache folder.
        val_tokens: token file whose ``val`` part scores the LM loss (must share the cache's tokenizer).
        allow_partial: train on the shards already finished in a cache that ``pd-lightning predict`` is still
            writing (or that was interrupted); the set is fixed when the data module is built.
    """

    def __init__(self, path: str, val_tokens: str | None = None, allow_partial: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cache = TeacherCache(path, allow_partial=allow_partial)
        if not self.cache.complete:
            _warn_partial(path, len(self.cache), self.cache.num_sequences)
        self.val_file = None
        if val_tokens is not None:
            self.val_file = TokenFile(val_tokens, flag="--data.val_tokens")
            self.cache.check_compatible(tokenizer_fingerprint=self.val_file.fingerprint, seq_len=None)

    @property
    def vocab_size(self) -> int:
        return self.cache.vocab_size

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.cache.spec.tokenizer_fingerprint

    @property
    def seq_len(self) -> int:
        return self.cache.seq_len

    @property
    def provides_teacher_targets(self) -> bool:
        return True

    def train_dataset(self) -> Dataset:
        return self.cache

    def val_dataset(self) -> Dataset | None:
        return None if self.val_file is None else TokenDataset(self.val_file, "val", self.val_sequences)


def _warn_partial(path: str, finished: int, total: int) -> None:
    """One notice (rank 0) that ``--data.allow_partial`` trains on a subset: an epoch is the finished part only."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(
            f"pd-lightning: warning: --data.allow_partial: training on {finished} of {total} sequences "
            f"({100.0 * finished / max(total, 1):.1f}%), the finished shards of the unfinished cache {path}; an epoch "
            "is that part only",
            file=sys.stderr,
            flush=True,
        )
