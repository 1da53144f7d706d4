"""``pd-lightning cache-upgrade``: a schema-1 teacher cache (one merged shard per writer rank) -> schema 2.

Entries, token rows, std and entropy are copied exactly (the entries are re-encoded from their decoded values,
which gives back the same 14-bit codes). Schema 1 stored neither the tail mass nor WTTM's ``U_gamma``: the tail is
derived from the kept entries (``1 - sum p``, which rounds tails below ~1e-4; see ``DistillLoss``) and no gamma
is stored (WTTM then approximates ``U_gamma``, with a warning). Rewrite the cache with ``pd-lightning predict``
for those two statistics.
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import torch

from pd_lightning.cache.format import (
    DEFAULT_SHARD_TOKENS,
    FORMAT_NAME,
    NLOGP_MAX,
    CacheCorruptError,
    CacheError,
    CacheSpec,
    decode,
    read_dataset,
)
from pd_lightning.cache.writer import CacheWriter
from pd_lightning.distill.target import SparseTarget

OLD_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.h5$")
_SPEC_FIELDS = ("teacher_fingerprint", "tokenizer_fingerprint", "source_fingerprint", "vocab_size", "seq_len",
                "num_sequences", "max_entries", "processor", "capture_temperature")  # fmt: skip


def upgrade_cache(path: str, output: str, shard_tokens: int = DEFAULT_SHARD_TOKENS, progress: bool = True) -> Path:
    """Copy the schema-1 cache ``path`` into a schema-2 cache at ``output`` (resumable: rerun after a kill).

    Args:
        path: the schema-1 cache folder (``shard-RRRRR-of-WWWWW.h5``); left unchanged.
        output: the new cache folder (must not be ``path``).
        shard_tokens: positions per new shard (``--writer.shard_tokens``).
        progress: show a progress bar.

    Returns:
        The new cache's ``index.json``.
    """
    src, out = Path(path), Path(output)
    if not src.is_dir():
        raise CacheError(f"cache-upgrade: {src} is not a cache folder")
    if out.resolve() == src.resolve():
        raise ValueError("cache-upgrade: --output must be another folder than the schema-1 cache")
    found = sorted((int(m[1]), int(m[2]), p) for p in src.iterdir() if (m := OLD_SHARD_RE.match(p.name)))
    if not found:
        raise CacheError(f"cache-upgrade: no schema-1 shards (shard-RRRRR-of-WWWWW.h5) in {src}")
    worlds = {w for _, w, _ in found}
    world = worlds.pop()
    if worlds or sorted(r for r, _, _ in found) != list(range(world)):
        raise CacheError(f"cache-upgrade: {src} does not hold one complete set of schema-1 shards")
    files = [p for _, _, p in found]
    handles = []
    try:
        for p in files:
            try:
                handles.append(h5py.File(p, "r"))
            except OSError as err:
                raise CacheCorruptError(f"cache-upgrade: cannot open {p} ({err})") from err
        attrs = [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()} for f in handles]
        for p, a in zip(files, attrs):
            if a.get("format") != FORMAT_NAME or int(a.get("schema_version", 0)) != 1 or not a.get("complete"):
                raise CacheError(f"cache-upgrade: {p} is not a complete schema-1 teacher cache shard")
        first = attrs[0]
        values = {k: first[k] for k in _SPEC_FIELDS}
        values["max_entries"] = values["max_entries"] or None
        nlogp_max = float(first.get("nlogp_max", NLOGP_MAX))
        spec = CacheSpec(**values, sequences_per_shard=max(1, shard_tokens // values["seq_len"]), nlogp_max=nlogp_max)
        index = [read_dataset(p, f["sequence_index"]) for p, f in zip(files, handles)]
        offsets = [read_dataset(p, f["sequence_offsets"]) for p, f in zip(files, handles)]
        where = np.full((spec.num_sequences, 2), -1, dtype=np.int64)  # (N, 2): shard, row
        for s, idx in enumerate(index):
            where[idx, 0], where[idx, 1] = s, np.arange(len(idx))
        if (where[:, 0] < 0).any():
            raise CacheCorruptError(f"cache-upgrade: {src} lacks {(where[:, 0] < 0).sum()} sequences")
        writer = CacheWriter(out, spec)
        k = spec.max_entries or max(int(a["max_count"]) for a in attrs) or 1
        length = spec.seq_len
        pending = writer.pending_sequences
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(pending), unit="seq", desc="cache-upgrade")
        for i in pending.tolist():
            s, r = where[i]
            f, p = handles[s], files[s]
            base = r * length
            counts = read_dataset(p, f["counts"], slice(base, base + length))
            entries = read_dataset(p, f["entries"], slice(int(offsets[s][r]), int(offsets[s][r + 1])))
            ids, logprobs = decode(counts, entries, k, nlogp_max)
            target = SparseTarget(
                ids=torch.from_numpy(ids),
                logprobs=torch.from_numpy(logprobs),
                std=torch.from_numpy(read_dataset(p, f["std"], slice(base, base + length)).astype(np.float32)),
                entropy=torch.from_numpy(read_dataset(p, f["entropy"], slice(base, base + length)).astype(np.float32)),
            )
            tokens = torch.from_numpy(read_dataset(p, f["tokens"], r).astype(np.int64))[None]
            writer.write(torch.tensor([i]), tokens, target)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return writer.finalize()
    finally:
        for f in handles:
            f.close()


def cache_upgrade_command(path: str, output: str | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS) -> None:
    """Convert a schema-1 teacher cache into the current format (the old folder is left unchanged).

    Args:
        path: the schema-1 cache folder.
        output: the new cache folder.
        shard_tokens: positions per new shard.
    """
    if output is None:
        raise ValueError("cache-upgrade needs --output NEW_FOLDER (the schema-1 cache is left unchanged)")
    index = upgrade_cache(path, output, shard_tokens)
    print(
        f"wrote {index}; schema 1 stored no tail mass and no U_gamma: the tail is derived from the kept entries and "
        "WTTM approximates U_gamma (rewrite the cache with `pd-lightning predict` for both)"
    )
