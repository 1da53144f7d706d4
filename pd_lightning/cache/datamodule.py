"""Training data from a teacher-logit cache: tokens + sparse teacher targets per position."""

from __future__ import annotations

import hashlib
import json
import sys

from torch.utils.data import DataLoader, Dataset

from pd_lightning.cache.format import CacheMismatchError
from pd_lightning.cache.reader import TeacherCache
from pd_lightning.corpus.datamodule import SequenceDataModule, TokenDataset
from pd_lightning.corpus.prepare import TokenFile


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
            writing (or that was interrupted). The set is the one rank 0 saw when its data module was built: every
            rank reads it (rank 0 broadcasts it when the loader is built), so the ranks agree on the epoch's length
            and order. It is stored in checkpoints, and a resumed run reads the checkpoint's set, also from a cache
            that has grown since.

    Why the loader hook: each rank builds its data module on its own (DDP starts the other ranks later), and the
    process group exists only from the trainer's setup on; ``train_dataloader`` runs on every rank after it, and
    after a checkpoint's ``load_state_dict``, so it sees both the group and a resumed run's set.
    """

    def __init__(self, path: str, val_tokens: str | None = None, allow_partial: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cache = TeacherCache(path, allow_partial=allow_partial)
        if not self.cache.complete:
            _warn_partial(path, len(self.cache), self.cache.num_sequences)
        self._snapshot_restored = False  # the checkpoint's set of shards is in use (load_state_dict)
        self.val_file = None
        if val_tokens is not None:
            self.val_file = TokenFile(val_tokens, flag="--data.val_tokens")
            theirs, ours = self.val_file.fingerprint, self.cache.spec.tokenizer_fingerprint
            if theirs != ours:  # named by the flag the user set (check_compatible's message names the cache)
                raise CacheMismatchError(
                    f"--data.val_tokens {val_tokens!r} was tokenized with tokenizer {theirs}, the teacher cache "
                    f"{path} with {ours}: give the token file of the cache's tokenizer (the one predict read)"
                )

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

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1 and not self._snapshot_restored and not self.cache.complete:
            # rank 0's snapshot of an unfinished cache for every rank (a resumed run's comes from the checkpoint, the
            # same on every rank); a complete cache is the same on every rank and needs no agreement
            shards = trainer.strategy.broadcast(self.cache.shard_ids.tolist(), src=0)
            self.cache.use_shards(shards, "rank 0's")
        return super().train_dataloader()

    def state_dict(self) -> dict:
        """The position, and the cache's shards read (a resumed run reads the same ones: see ``allow_partial``)."""
        state = super().state_dict()
        if state:
            state["cache_spec"] = _spec_digest(self.cache)
            state["cache_shards"] = None if self.cache.complete else self.cache.shard_ids.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if not state:
            return
        if "cache_spec" not in state:  # written before checkpoints stored the set read
            if not self.cache.complete:
                _say(f"pd-lightning: warning: --data.allow_partial: the checkpoint does not say which shards of "
                     f"{self.cache.path} it trained on (an older checkpoint); resuming on the {len(self.cache)} "
                     "sequences finished now, so the order of the resumed epoch may differ from the interrupted "
                     "run's")  # fmt: skip
            return
        shards = state.get("cache_shards")
        if state["cache_spec"] != _spec_digest(self.cache) or shards is None:
            return  # trained on the complete cache, or on another cache than this one: nothing to restore
        finished = len(self.cache)
        self.cache.use_shards(shards, "the checkpoint's")
        self._snapshot_restored = True
        if len(self.cache) != finished:
            _say(f"pd-lightning: warning: --data.allow_partial: resuming on the {len(self.cache)} sequences of "
                 f"{self.cache.path} that the checkpoint trained on, as it did ({finished} are finished now; a new "
                 "run reads them)")  # fmt: skip

    def val_dataset(self) -> Dataset | None:
        return None if self.val_file is None else TokenDataset(self.val_file, "val", self.val_sequences)


def _spec_digest(cache: TeacherCache) -> str:
    return hashlib.sha256(json.dumps(cache.spec.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def _say(line: str) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(line, file=sys.stderr, flush=True)


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
