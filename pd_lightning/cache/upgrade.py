"""``pd-lightning cache-upgrade``: an older teacher cache -> the current format (schema 3).

Schema 2 -> 3: every shard's datasets are copied as they are (token rows, counts, statistics) and its entries are
coded into schema 3's blocks from the same 14-bit codes, so the result is byte for byte what ``pd-lightning
predict`` writes for the same teacher and data (same ``--writer.shard_tokens``), and reads back the same values.

Schema 1 (one merged shard per writer rank) -> 3:

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
    SCHEMA1_RE,
    SCHEMA_VERSION,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheSpec,
    EncodedSequences,
    decode,
    read_dataset,
    read_layout,
)
from pd_lightning.cache.writer import CacheWriter
from pd_lightning.distill.target import SparseTarget

_COPY_SEQUENCES = 64  # schema 2 -> 3: sequences read and written at a time
OLD_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.h5$")
_SPEC_FIELDS = ("teacher_fingerprint", "tokenizer_fingerprint", "source_fingerprint", "vocab_size", "seq_len",
                "num_sequences", "max_entries", "processor", "capture_temperature")  # fmt: skip


def upgrade_cache(path: str, output: str, shard_tokens: int | None = None, progress: bool = True) -> Path:
    """Copy the schema-1 or schema-2 cache ``path`` into a schema-3 cache at ``output`` (resumable: rerun after a kill).

    Args:
        path: the old cache folder (schema 1: ``shard-RRRRR-of-WWWWW.h5``; schema 2: ``shard-NNNNNN.h5`` + index);
            left unchanged.
        output: the new cache folder (must not be ``path``).
        shard_tokens: positions per new shard (``--writer.shard_tokens``); default: a schema-2 cache's own, 2^23
            for schema 1.
        progress: show a progress bar.

    Returns:
        The new cache's ``index.json``.
    """
    src, out = Path(path), Path(output)
    if not src.is_dir():
        raise CacheError(f"cache-upgrade: {src} is not a cache folder")
    if shard_tokens is not None and (isinstance(shard_tokens, bool) or shard_tokens < 1):
        raise ValueError(f"cache-upgrade: --shard_tokens must be >= 1, got {shard_tokens}")
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise ValueError(f"cache-upgrade: --output {out} must be a folder outside the old cache {src}")
    _check_output(out)
    if not any(SCHEMA1_RE.match(p.name) for p in src.iterdir()):
        return _upgrade_schema2(src, out, shard_tokens, progress)
    shard_tokens = DEFAULT_SHARD_TOKENS if shard_tokens is None else shard_tokens
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
        writer = _writer(out, spec)
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


def _check_output(out: Path) -> None:
    """Refuse an ``--output`` that is a file or holds another cache (an unfinished upgrade into it is resumed)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"cache-upgrade: --output {out} is a file, not a folder; name a new folder")
    try:
        layout = read_layout(out, check_files=False) if out.is_dir() else None
    except CacheError as err:
        raise CacheError(f"cache-upgrade: --output {out} holds something else ({err}); name a new folder") from err
    if layout is not None and layout.schema != SCHEMA_VERSION:
        raise CacheError(
            f"cache-upgrade: --output {out} holds a schema-{layout.schema} cache; name a new folder (cache-upgrade "
            "never replaces a cache)"
        )


def _writer(out: Path, spec: CacheSpec) -> CacheWriter:
    """The schema-3 writer of ``out``; a cache of other parameters there is refused naming ``--output``."""
    try:
        return CacheWriter(out, spec)
    except CacheError as err:
        raise type(err)(
            f"cache-upgrade: --output {out} holds another teacher cache; name a new folder (cache-upgrade never "
            "replaces a cache)"
        ) from err


def _upgrade_schema2(src: Path, out: Path, shard_tokens: int | None, progress: bool) -> Path:
    """Schema 2 -> 3, shard by shard, ``_COPY_SEQUENCES`` sequences at a time (bounded memory)."""
    layout = read_layout(src)
    if layout is None:
        raise CacheError(f"cache-upgrade: no teacher cache in {src} (no index.json or index-*-of-*.json)")
    if layout.schema == SCHEMA_VERSION:
        raise CacheError(f"cache-upgrade: {src} is already a schema-{SCHEMA_VERSION} cache; nothing to convert")
    if not layout.complete:
        raise CacheIncompleteError(
            f"cache-upgrade: {src} is unfinished ({len(layout.shards)} of {layout.spec.num_shards} shards); finish it "
            "first by rerunning `pd-lightning predict` with the same arguments and --writer.schema 2"
        )
    spec = layout.spec
    if shard_tokens is not None:
        spec = CacheSpec(**{**spec.__dict__, "sequences_per_shard": max(1, shard_tokens // spec.seq_len)})
    from pd_lightning.cache.reader import TeacherCache

    TeacherCache(src)  # checks every shard's header against the index (one clear error if one is not of the cache)
    writer = _writer(out, spec)
    pending = set(writer.pending_sequences.tolist())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit="seq", desc="cache-upgrade")
    length = spec.seq_len
    try:
        for j in sorted(layout.shards):
            start, stop = layout.spec.shard_range(j)
            if not any(i in pending for i in range(start, stop)):
                continue
            file = layout.file(j)
            with h5py.File(file, "r") as f:
                offsets = read_dataset(file, f["sequence_offsets"])
                for a in range(0, stop - start, _COPY_SEQUENCES):
                    b = min(a + _COPY_SEQUENCES, stop - start)
                    pos = slice(a * length, b * length)
                    encoded = EncodedSequences(
                        sequence_index=np.arange(start + a, start + b, dtype=np.int64),
                        tokens=read_dataset(file, f["tokens"], slice(a, b)),
                        counts=read_dataset(file, f["counts"], pos),
                        entries=read_dataset(file, f["entries"], slice(int(offsets[a]), int(offsets[b]))),
                        std=read_dataset(file, f["std"], pos),
                        entropy=read_dataset(file, f["entropy"], pos),
                        tail=read_dataset(file, f["tail"], pos),
                        power_sum=read_dataset(file, f["power_sum"], pos),
                    )
                    writer.write_encoded(encoded)
                    if bar is not None:
                        bar.update(b - a)
        return writer.finalize()
    except BaseException:
        writer.close()  # the partly written shard goes; a rerun resumes from the finished ones
        raise
    finally:
        if bar is not None:
            bar.close()


def cache_upgrade_command(path: str, output: str | None = None, shard_tokens: int | None = None) -> None:
    """Convert an older teacher cache (schema 1 or 2) into the current format, schema 3 (the old folder is left
    unchanged).

    Args:
        path: the old cache folder.
        output: the new cache folder.
        shard_tokens: positions per new shard (default: a schema-2 cache's own; 2^23 for schema 1).
    """
    if output is None:
        raise ValueError("cache-upgrade needs --output NEW_FOLDER (the old cache is left unchanged)")
    schema1 = Path(path).is_dir() and any(SCHEMA1_RE.match(p.name) for p in Path(path).iterdir())
    index = upgrade_cache(path, output, shard_tokens)
    if not schema1:
        print(f"wrote {index}: schema {SCHEMA_VERSION}, the same values as {path}")
        return
    print(
        f"wrote {index}; schema 1 stored no tail mass and no U_gamma: the tail is derived from the kept entries and "
        "WTTM approximates U_gamma (rewrite the cache with `pd-lightning predict` for both)"
    )
