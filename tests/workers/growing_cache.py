"""Test pieces for ``--data.allow_partial`` with several reader ranks (tests/test_partial_ddp.py).

- :func:`finish_next_shard`: what a running ``pd-lightning predict`` does to a partial cache, by copying: the next
  shard of a complete ``source`` cache of the same spec is renamed into place and recorded in the rank index.
- :class:`GrowingCacheDataModule`: a ``CacheDataModule`` whose DDP rank-1 process (``LOCAL_RANK=1``, started by
  Lightning after rank 0 built its data module) first finishes one more shard: the ranks look at the cache at
  different moments, as they do while a writer is running.
- :class:`LogReads`: appends ``<epoch> <global step> <token ids>`` of every trained sequence to
  ``<log_dir>/reads-<rank>.txt`` (at ``on_train_batch_start``: batches that train, not prefetched ones).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import lightning as L

from pd_lightning.cache.datamodule import CacheDataModule
from pd_lightning.cache.format import CacheSpec, index_document, rank_index_name, shard_name, write_json_atomic

INDEX = rank_index_name(0, 1)


def finish_next_shard(path: str | Path, source: str | Path) -> int | None:
    """Finish the lowest shard of ``path`` that its index does not list, from ``source``; its number (None: none)."""
    path, source = Path(path), Path(source)
    doc = json.loads((source / "index.json").read_text())
    spec = CacheSpec.from_json(doc["spec"], source)
    records = {int(j): r for j, r in doc["shards"].items()}
    index = path / INDEX
    done = {int(j) for j in json.loads(index.read_text())["shards"]} if index.exists() else set()
    todo = sorted(set(records) - done)
    if not todo:
        return None
    j = todo[0]
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / shard_name(j), path / (shard_name(j) + ".tmp"))
    os.replace(path / (shard_name(j) + ".tmp"), path / shard_name(j))
    done.add(j)
    write_json_atomic(index, index_document(spec, {k: records[k] for k in done}, rank=0, world_size=1))
    return j


class GrowingCacheDataModule(CacheDataModule):
    """``CacheDataModule`` (``allow_partial``) whose rank-1 process finishes one more shard before it looks."""

    def __init__(self, path: str, source: str, batch_size: int = 8, seed: int | None = None) -> None:
        if os.environ.get("LOCAL_RANK") == "1":
            finish_next_shard(path, source)
        super().__init__(path=path, allow_partial=True, batch_size=batch_size, seed=seed)


class LogReads(L.Callback):
    def __init__(self, log_dir: str) -> None:
        self.log_dir = Path(log_dir)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"reads-{trainer.global_rank}.txt", "a") as f:
            for row in batch["input_ids"].tolist():
                f.write(f"{trainer.current_epoch} {trainer.global_step} {' '.join(map(str, row))}\n")
