"""Inspecting a teacher cache: full verification, size/statistics summary, entries-per-token histogram plot."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pd_lightning.cache.format import (
    BLOCK_POSITIONS,
    DATASETS,
    DATASETS3,
    DEFAULT_SHARD_TOKENS,
    MAX_VOCAB,
    Q_BITS,
    SCHEMA_VERSION,
    SCHEMAS,
    SMALL_VOCAB,
    STAT_DATASETS,
    CacheCorruptError,
    CacheIncompleteError,
    CacheMismatchError,
    blocks_per_sequence,
    code_step,
    read_dataset,
    shard_schema,
)
from pd_lightning.cache.reader import RESUME, TeacherCache, open_layout

_BLOCK_TOKENS = 1 << 20  # positions scanned per step
# Schema 3's bytes per stored entry without a sample: `benchmarks/cache_size.py`'s v3_bytes_per_entry_151k (the demo
# teacher's held-out top-0.95-100 entries, ids mapped one-to-one into a 151,552 vocabulary; benchmarks/RESULTS.md).
SCHEMA3_BYTES_PER_ENTRY = 2.32


def _blocks(offsets: np.ndarray, length: int) -> list[tuple[int, int]]:
    """Sequence ranges ``[a, b)`` of about ``_BLOCK_TOKENS`` positions."""
    step = max(1, _BLOCK_TOKENS // length)
    n = len(offsets) - 1
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def _check_finite(file: Path, f: h5py.File, a: int, b: int) -> dict[str, np.ndarray]:
    """The statistics of positions ``[a, b)`` (float64), refusing NaN/Inf with the shard and position named."""
    out = {}
    for name in STAT_DATASETS:
        value = read_dataset(file, f[name], slice(a, b)).astype(np.float64)
        bad = ~np.isfinite(value.reshape(len(value), -1)).all(-1)
        if bad.any():
            raise CacheCorruptError(
                f"cache shard {file} holds a non-finite teacher statistic ({name}) at position "
                f"{a + int(np.flatnonzero(bad)[0])}; delete the shard and {RESUME}"
            )
        out[name] = value
    return out


def _verify_shard(file: Path, length: int, vocab_size: int) -> tuple[int, int, int, int]:
    """Read every byte of one shard, checking it (see :func:`verify`); (sequences, tokens, entries, max id)."""
    max_id = -1
    with h5py.File(file, "r") as f:
        schema = shard_schema(f.attrs)
        for name in DATASETS3 if schema == 3 else DATASETS:  # the small ones in full; big ones block by block below
            if name not in f:
                raise CacheCorruptError(f"cache shard {file} lacks dataset '{name}'")
        offsets = read_dataset(file, f["sequence_offsets"])
        num_seq = len(offsets) - 1
        num_entries = int(offsets[-1]) if schema == 3 else f["entries"].shape[0]
        index = read_dataset(file, f["sequence_index"])  # global sequence numbers (for the messages)
        if offsets[0] != 0 or offsets[-1] != num_entries or (np.diff(offsets) < 0).any():
            raise CacheCorruptError(f"cache shard {file}: sequence_offsets inconsistent with 'entries'")
        if f["tokens"].shape != (num_seq, length + 1) or f["counts"].shape[0] != num_seq * length:
            raise CacheCorruptError(f"cache shard {file}: dataset shapes do not match {num_seq} sequences")
        if schema == 3:
            from pd_lightning.cache.codec import IdTable, decode_block

            nb = blocks_per_sequence(length)
            first_sequence = int(f.attrs["first_sequence"])
            block_offsets = read_dataset(file, f["block_offsets"])
            if (
                len(block_offsets) != num_seq * nb + 1
                or block_offsets[0] != 0
                or block_offsets[-1] != f["blocks"].shape[0]
                or (np.diff(block_offsets) <= 0).any()
            ):
                raise CacheCorruptError(f"cache shard {file}: 'block_offsets' inconsistent with 'blocks'")
            try:
                table = IdTable.from_bytes(read_dataset(file, f["id_table"]).tobytes())
            except ValueError as err:
                raise CacheCorruptError(f"cache shard {file}: dataset 'id_table' is corrupt ({err})") from err
            if table.vocab_size != vocab_size:
                raise CacheCorruptError(f"cache shard {file}: its id table is for vocab_size {table.vocab_size}")
        for a, b in _blocks(offsets, length):
            _check_finite(file, f, a * length, b * length)
            tokens = read_dataset(file, f["tokens"], slice(a, b))
            counts = read_dataset(file, f["counts"], slice(a * length, b * length)).astype(np.int64)
            if not np.array_equal(counts.reshape(-1, length).sum(1), np.diff(offsets[a : b + 1])):
                raise CacheCorruptError(f"cache shard {file}: 'counts' disagree with 'sequence_offsets'")
            if schema == 3:
                lo, hi = int(block_offsets[a * nb]), int(block_offsets[b * nb])
                data = memoryview(read_dataset(file, f["blocks"], slice(lo, hi)))
                for blk in range(a * nb, b * nb):  # decode every block: the codec's own checks catch the rest
                    s, q = divmod(blk, nb)
                    p0 = s * length + q * BLOCK_POSITIONS
                    c = counts[p0 - a * length : min(p0 + BLOCK_POSITIONS, (s + 1) * length) - a * length]
                    x, y = int(block_offsets[blk]) - lo, int(block_offsets[blk + 1]) - lo
                    try:  # the block's place: its global sequence by the shard's position in the cache
                        ids, _ = decode_block(data[x:y], c, table, position=(first_sequence + s) * nb + q)
                    except ValueError as err:
                        seq = int(index[s]) if s < len(index) else s  # the reader's numbering, not the shard's row
                        raise CacheCorruptError(
                            f"cache shard {file}: entry block {blk} (sequence {seq}) is corrupt ({err})"
                        ) from err
                    if ids.size:
                        max_id = max(max_id, int(ids.max()))
            else:
                entries = read_dataset(file, f["entries"], slice(int(offsets[a]), int(offsets[b])))
                if entries.size:
                    max_id = max(max_id, int((entries >> Q_BITS).max()))
            if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
                raise CacheCorruptError(f"cache shard {file}: token ids outside [0, {vocab_size})")
    return num_seq, num_seq * length, int(num_entries), max_id


def verify(path: str | Path, vocab_size: int | None = None, allow_partial: bool = False) -> dict[str, Any]:
    """Read every byte of a cache, checking checksums and consistency; return a short summary.

    Checks: the indexes agree and name existing, complete shards of one spec (else :class:`CacheIncompleteError` /
    :class:`CacheMismatchError`); fletcher32 of every chunk, the internal consistency of counts, offsets and sizes,
    and finite statistics (else :class:`CacheCorruptError` naming file and dataset); ids and tokens below the
    cache's vocabulary and below ``vocab_size`` (else :class:`CacheMismatchError`).

    Args:
        path: the cache folder.
        vocab_size: the student's vocabulary size (optional).
        allow_partial: verify the finished shards of an unfinished cache.
    """
    cache = TeacherCache(path, allow_partial=allow_partial)
    limit = cache.vocab_size if vocab_size is None else min(vocab_size, cache.vocab_size)
    tokens_total, entries_total, max_id, sequences = 0, 0, -1, 0
    for file in cache.files:
        num_seq, tokens, entries, top = _verify_shard(file, cache.seq_len, cache.vocab_size)
        tokens_total, entries_total, sequences, max_id = (
            tokens_total + tokens,
            entries_total + entries,
            sequences + num_seq,
            max(max_id, top),
        )
    if max_id >= limit:
        raise CacheMismatchError(
            f"teacher cache {path} holds id {max_id}, not below vocab_size={limit} "
            f"(cache vocab {cache.vocab_size}, student vocab {vocab_size})"
        )
    return {"shards": len(cache.files), "sequences": sequences, "tokens": tokens_total, "entries": entries_total}


def _finished(path: Path):
    """The layout of a cache and a reader of its finished shards; refused when none is finished."""
    layout = open_layout(path)
    if not layout.shards:
        raise CacheIncompleteError(f"teacher cache {path} has no finished shard yet; {RESUME}")
    return layout, TeacherCache(path, allow_partial=True)


def damaged_shards(path: str | Path) -> tuple[int, list[tuple[Path, str]]]:
    """Read every byte of every finished shard of a cache (see :func:`verify`); (shards read, [(shard, why), ...])
    for each shard that fails a checksum or a consistency check, all of them (not only the first)."""
    _, cache = _finished(Path(path))
    damaged = []
    for file in cache.files:
        try:
            _, _, _, top = _verify_shard(file, cache.seq_len, cache.vocab_size)
        except CacheCorruptError as e:
            why = str(e).replace(f"cache shard {file}", "").strip(" :") or "damaged"
            checksum = re.match(r"dataset '([^']+)' is corrupt \(.*filter returned failure", why)
            damaged.append((file, f"dataset '{checksum[1]}' fails its checksum" if checksum else why))
            continue
        if top >= cache.vocab_size:
            damaged.append((file, f"holds id {top}, not below the cache's vocab_size {cache.vocab_size}"))
    return len(cache.files), damaged


def cache_info(path: str | Path, sample_tokens: int | None = None, sample_shards: int = 64) -> dict[str, Any]:
    """Size and content statistics of a cache (for ``pd-lightning cache-info``), from its index and shards.

    Keys: ``tokens``, ``entries``, ``bytes`` (files on disk), ``bytes_per_token``, ``bytes_per_entry`` (the
    ``entries`` dataset's storage per entry), ``bookkeeping_bytes_per_token`` (counts + per-sequence tables),
    ``stats_bytes_per_token`` (std, entropy, tail, power sums), ``token_bytes_per_token``,
    ``mean_entries_per_token``, ``entries_histogram`` (``{entries per position: positions}``), ``mean_kept_mass``
    (from the stored tail: ``1 - tail``), ``mean_std``, ``mean_entropy``, ``sampled_tokens``, ``sampled_shards``,
    the spec (``schema_version``, fingerprints, ``processor``, ``power_gammas``, ...), ``shards`` (finished),
    ``num_shards`` (in the complete cache) and ``complete``. An unfinished cache gives ``complete: False``, the
    reason, and the figures of its finished shards. Non-finite statistics raise :class:`CacheCorruptError`.

    ``tokens``, ``entries`` and ``bytes`` cover every finished shard (from the index and the file sizes); the
    per-dataset storage, the histogram and the means come from at most ``sample_shards`` evenly spaced shards
    (all of them up to that count), so the command stays fast on a cache of thousands of shards.

    Args:
        path: the cache folder.
        sample_tokens: positions per sampled shard scanned for the histogram and means (``None``: all).
        sample_shards: shards scanned for storage, histogram and means.
    """
    path = Path(path)
    layout, cache = _finished(path)
    length, k = cache.seq_len, cache.max_entries
    names = DATASETS3 if layout.schema == 3 else DATASETS
    storage = dict.fromkeys(names, 0)
    records = [layout.shards[int(j)] for j in cache.shard_ids]
    tokens = sum(int(r["num_tokens"]) for r in records)
    entries = sum(int(r["num_entries"]) for r in records)
    total_bytes = sum(file.stat().st_size for file in cache.files)
    files = cache.files
    if len(files) > sample_shards:
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, max(sample_shards, 1)).round()]
    scanned = sampled_shard_tokens = 0
    histogram = np.zeros(k + 1, dtype=np.int64)
    kept_mass = std_sum = entropy_sum = 0.0
    for file in files:
        with h5py.File(file, "r") as f:
            offsets = read_dataset(file, f["sequence_offsets"])
            for name in names:
                storage[name] += f[name].id.get_storage_size()
            sampled_shard_tokens += int(f.attrs["num_tokens"])
            budget = int(f.attrs["num_tokens"]) if sample_tokens is None else sample_tokens
            for a, b in _blocks(offsets, length):
                if budget <= 0:
                    break
                b = min(b, a + max(1, -(-budget // length)))
                counts = read_dataset(file, f["counts"], slice(a * length, b * length)).astype(np.int64)
                stats = _check_finite(file, f, a * length, b * length)
                histogram += np.bincount(counts, minlength=k + 1)[: k + 1]
                kept_mass += float((1.0 - stats["tail"]).sum())
                std_sum += float(stats["std"].sum())
                entropy_sum += float(stats["entropy"].sum())
                scanned += len(counts)
                budget -= len(counts)
    scale = tokens / max(sampled_shard_tokens, 1)  # storage of the sampled shards -> all shards
    storage = {name: value * scale for name, value in storage.items()}
    index_bytes = sum(p.stat().st_size for p in path.glob("index*.json"))
    spec = cache.meta
    entry_storage = (
        storage["entries"] if layout.schema == 2 else sum(storage[n] for n in ("blocks", "block_offsets", "id_table"))
    )
    info = {
        "path": str(path),
        "complete": layout.complete,
        "schema_version": layout.schema,
        "entry_coding": "packed id << 14 | q (4 or 8 B)" if layout.schema == 2 else "coded blocks (pde3, zstd planes)",
        **{key: spec[key] for key in ("teacher_fingerprint", "tokenizer_fingerprint", "source_fingerprint")},
        "processor": spec["processor"],
        "power_gammas": list(cache.spec.power_gammas),
        "vocab_size": cache.vocab_size,
        "seq_len": length,
        "num_sequences": cache.num_sequences,
        "finished_sequences": len(cache),
        "max_entries": k,
        "shards": len(cache.files),
        "num_shards": cache.spec.num_shards,
        "sequences_per_shard": cache.spec.sequences_per_shard,
        "tokens": tokens,
        "entries": entries,
        "bytes": total_bytes + index_bytes,
        "bytes_per_token": (total_bytes + index_bytes) / max(tokens, 1),
        "bytes_per_entry": entry_storage / max(entries, 1),
        # a bound, not a measurement (a cache holds no fp32 reference): the stored -log p are q * step (both
        # schemas), |error| <= step / 2 for p >= 1e-6 (smaller p are clamped up to 1e-6)
        "max_abs_logprob_error_bound": code_step(cache.spec.nlogp_max) / 2,
        "bookkeeping_bytes_per_token": sum(storage[n] for n in ("counts", "sequence_index", "sequence_offsets"))
        / max(tokens, 1),
        "stats_bytes_per_token": sum(storage[n] for n in STAT_DATASETS) / max(tokens, 1),
        "token_bytes_per_token": storage["tokens"] / max(tokens, 1),
        "mean_entries_per_token": entries / max(tokens, 1),
        "entries_histogram": {int(c): int(n) for c, n in enumerate(histogram) if n},
        "mean_kept_mass": kept_mass / max(scanned, 1),
        "mean_std": std_sum / max(scanned, 1),
        "mean_entropy": entropy_sum / max(scanned, 1),
        "sampled_tokens": scanned,
        "sampled_shards": len(files),
    }
    if cache.spec.cross_tokenizer:  # a teacher with another tokenizer (issue 20): its coverage of the text
        from pd_lightning.crosstok.cache_figures import cross_tokenizer_figures

        info.update(cross_tokenizer_figures(files, cache.spec))
    if not layout.complete:
        info["reason"] = (
            f"{layout.finished_sequences} of {layout.spec.num_sequences} sequences in finished shards; {RESUME}"
        )
    return info


def plot_entries_histogram(info: dict[str, Any], png_path: str | Path) -> Path:
    """Bar chart of ``info["entries_histogram"]`` (from :func:`cache_info`) saved as a PNG.

    Args:
        info: the :func:`cache_info` dict (JSON round-trips with string keys are accepted).
        png_path: output file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = {int(c): int(n) for c, n in info["entries_histogram"].items()}
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(list(hist), list(hist.values()), width=1.0)
    ax.set_xlabel("kept entries per token")
    ax.set_ylabel("tokens")
    proc = info.get("processor", {})
    name = proc.get("class_path", "?").rsplit(".", 1)[-1] if isinstance(proc, dict) else str(proc)
    args = json.dumps(proc.get("init_args", {})) if isinstance(proc, dict) else ""
    ax.set_title(
        f"{name} {args}: mean {info['mean_entries_per_token']:.1f} entries, "
        f"{info['bytes_per_token']:.1f} B/token, kept mass {info['mean_kept_mass']:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path


def cache_plan(
    tokens: float,
    vocab: int,
    p: float | None = None,
    k: int | None = None,
    from_cache: str | None = None,
    teacher_tokens_per_s: float = 20_000.0,
    gpus: int = 8,
    seq_len: int = 4096,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    power_gammas: int = 1,
    schema: int = SCHEMA_VERSION,
) -> dict[str, Any]:
    """Expected size, shards, disk and write bandwidth of a cache, on paper (``pd-lightning cache-plan``).

    Bytes per token follow the format (``cache_format``): 4 (token id) + 1 or 2 (count) + 6 (std, entropy, tail)
    + 2 per stored gamma + 20 / ``seq_len`` (per-sequence tables) + entries/token x bytes per entry. Schema 2: 4 B
    (8 B above 2^18 ids) x (1 + 4 / 16384) (fletcher32 per 16k-entry chunk). Schema 3 (the default): the bytes per
    entry of a schema-3 sample cache (``from_cache``: its coding on your teacher's entries), else
    ``SCHEMA3_BYTES_PER_ENTRY`` (measured on the demo teacher's held-out top-0.95-100 entries at a 151,552-entry
    vocabulary, ``benchmarks/cache_size.py``), plus 8 B per 2,048 positions (block offsets). Entries/token come
    from a sample cache (``from_cache``, the measured mean of a cache written with the same processor) or, without
    one, are assumed to be ``k`` (an upper bound for top-p-k: the nucleus often stops earlier). Per-file HDF5
    overhead (a few KB per shard) is ignored.

    Args:
        tokens: tokens to cache (e.g. ``100e9``).
        vocab: the teacher's vocabulary size.
        p: top-p of the truncation (informational unless a sample is given); default the sample's, else 0.95.
        k: top-k of the truncation; default the sample's, else 100.
        from_cache: a cache written with the same processor on a sample of the corpus (other p/k are refused).
        teacher_tokens_per_s: teacher forward throughput per GPU (assumed 20,000: a ~9B teacher's forward pass at
            ~40% MFU of an H100 in bf16; measure yours with a short `pd-lightning predict`).
        gpus: writer ranks (GPUs).
        seq_len: sequence length (for the per-sequence bookkeeping).
        shard_tokens: ``--writer.shard_tokens``.
        power_gammas: number of stored WTTM gammas (``--model.power_gammas``; default one, 0.5).
        schema: the cache format planned (``--writer.schema``): 3 (default) or 2.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"cache-plan: --schema {schema} must be one of {list(SCHEMAS)}")
    sample = cache_info(from_cache) if from_cache is not None else None
    if sample is not None:
        args = (sample.get("processor") or {}).get("init_args", {})
        have_p, have_k = args.get("p", 1.0), args.get("k") or sample["max_entries"]
        if (p is not None and p != have_p) or (k is not None and k != have_k):
            raise ValueError(
                f"cache-plan: --from-cache {from_cache} holds top-{have_p}-{have_k}, not the planned "
                f"top-{have_p if p is None else p}-{have_k if k is None else k}; give a sample of the same processor "
                "or leave --p/--k out to plan the sample's"
            )
        p, k = have_p, have_k
    p, k = 0.95 if p is None else p, 100 if k is None else k
    _check_plan(tokens, vocab, p, k, teacher_tokens_per_s, gpus, seq_len, shard_tokens, power_gammas)
    if sample is not None:
        entries_per_token = float(sample["mean_entries_per_token"])
        source = f"measured in {from_cache} ({sample['tokens']} tokens)"
    else:
        entries_per_token = float(k)
        source = f"assumed = k = {k} (upper bound; pass --from_cache SAMPLE for a measured figure)"
    fixed = 4 + (1 if k <= 255 else 2) + 6 + 2 * power_gammas + 20 / seq_len
    if schema == 2:
        entry_bytes, entry_source = (4 if vocab <= SMALL_VOCAB else 8) * (1 + 4 / 16384), "schema 2: packed entries"
    elif sample is not None and sample["schema_version"] == 3 and sample["vocab_size"] == vocab:
        entry_bytes, entry_source = float(sample["bytes_per_entry"]), f"schema 3, measured in {from_cache}"
    else:
        entry_bytes = SCHEMA3_BYTES_PER_ENTRY
        entry_source = "schema 3, measured on the demo teacher at a 151,552 vocabulary (pass a schema-3 --from_cache)"
        if sample is not None and sample["schema_version"] == 3:  # ids cost more bits in a larger vocabulary
            entry_source = (
                f"schema 3, measured on the demo teacher at a 151,552 vocabulary: the sample's vocabulary "
                f"({sample['vocab_size']}) is not --vocab {vocab}, so its own bytes/entry do not apply"
            )
    if schema == 3:
        fixed += 8 / BLOCK_POSITIONS  # block offsets
    per_token = fixed + entries_per_token * entry_bytes
    total = tokens * per_token
    shard_tokens_eff = max(1, shard_tokens // seq_len) * seq_len
    shards = math.ceil(tokens / shard_tokens_eff)
    per_gpu_tokens = tokens / gpus
    return {
        "tokens": tokens,
        "vocab": vocab,
        "processor": f"top-{p}-{k}",
        "entries_per_token": entries_per_token,
        "entries_per_token_source": source,
        "schema": schema,
        "bytes_per_entry": entry_bytes,
        "bytes_per_entry_source": entry_source,
        "bytes_per_token": per_token,
        "total_bytes": total,
        "total_TB": total / 1e12,
        "shard_tokens": shard_tokens_eff,
        "shard_GB": shard_tokens_eff * per_token / 1e9,
        "shards": shards,
        "gpus": gpus,
        "disk_per_gpu_TB": total / gpus / 1e12,
        "teacher_tokens_per_s_per_gpu": teacher_tokens_per_s,
        "write_MB_per_s_per_gpu": teacher_tokens_per_s * per_token / 1e6,
        "hours": per_gpu_tokens / teacher_tokens_per_s / 3600,
        "peak_extra_disk_GB_per_gpu": shard_tokens_eff * per_token / 1e9,
    }


# What a plan can be about: far beyond any real run, but below the sizes where the figures stop meaning anything
# (``--tokens 1e300`` printed 300-digit sizes). The largest published pre-training corpora are ~1.5e13 tokens.
PLAN_LIMITS = {
    "--tokens": (1, 1e16, "tokens"),
    "--teacher_tokens_per_s": (1e-3, 1e9, "tokens per second per GPU"),
    "--gpus": (1, 10_000_000, "GPUs"),
    "--seq_len": (1, 1 << 31, "tokens per sequence"),
    "--shard_tokens": (1, 1e16, "tokens per shard"),
    "--power_gammas": (0, 64, "stored gammas"),
}


def _check_plan(tokens, vocab, p, k, teacher_tokens_per_s, gpus, seq_len, shard_tokens, power_gammas) -> None:
    """Refuse, naming the flag, a value that is not a finite number in its range (see ``PLAN_LIMITS``)."""
    values = {"--tokens": tokens, "--teacher_tokens_per_s": teacher_tokens_per_s, "--gpus": gpus,
              "--seq_len": seq_len, "--shard_tokens": shard_tokens, "--power_gammas": power_gammas}  # fmt: skip
    for flag, value in values.items():
        low, high, what = PLAN_LIMITS[flag]
        if not math.isfinite(value) or not low <= value <= high:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            hint = " (rounded down to whole sequences, at least one, as the writer does)"
            hint = hint if flag == "--shard_tokens" else ""
            raise ValueError(
                f"cache-plan: {flag} {shown} is not a plausible number of {what}: give {low:g} to {high:g}{hint}"
            )
    if not 1 <= vocab <= MAX_VOCAB:
        raise ValueError(f"cache-plan: --vocab {vocab} must lie in 1 .. {MAX_VOCAB} (the cache format's limit)")
    if not (math.isfinite(p) and 0 < p <= 1):
        raise ValueError(f"cache-plan: --p {p} must be in (0, 1]")
    if not 1 <= k <= vocab:
        raise ValueError(f"cache-plan: --k {k} must lie in 1 .. --vocab {vocab} (top-k keeps at most the vocabulary)")


def cache_plan_command(
    tokens: float | None = None,
    vocab: int | None = None,
    p: float | None = None,
    k: int | None = None,
    from_cache: str | None = None,
    teacher_tokens_per_s: float = 20_000.0,
    gpus: int = 8,
    seq_len: int = 4096,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    power_gammas: int = 1,
    schema: int = SCHEMA_VERSION,
    json: bool = False,
) -> None:
    """Plan a teacher cache on paper: expected size, shards, disk and write bandwidth per GPU.

    Args:
        tokens: tokens to cache (e.g. 100e9).
        vocab: the teacher's vocabulary size (GLM-4-9B: 151552).
        p: top-p of the truncation (default: the sample's, else 0.95).
        k: top-k of the truncation (default: the sample's, else 100).
        from_cache: a sample cache written with the same processor (measured entries per token; other p/k refused).
        teacher_tokens_per_s: teacher throughput per GPU (default an assumption, see the docs).
        gpus: writer ranks.
        seq_len: sequence length.
        shard_tokens: positions per shard (--writer.shard_tokens).
        power_gammas: number of stored WTTM gammas.
        schema: the cache format (3, the default, or 2: ``predict --writer.schema``).
        json: print one JSON object.
    """
    import json as json_lib

    if tokens is None or vocab is None:
        raise ValueError("cache-plan needs --tokens (e.g. 100e9) and --vocab (the teacher's vocabulary size)")
    plan = cache_plan(
        tokens, vocab, p, k, from_cache, teacher_tokens_per_s, gpus, seq_len, shard_tokens, power_gammas, schema
    )
    if json:
        print(json_lib.dumps(plan))
        return
    print(f"cache plan: {plan['processor']} of a {vocab}-entry teacher over {tokens:.4g} tokens on {gpus} GPUs")
    print(f"  entries/token        {plan['entries_per_token']:.2f} ({plan['entries_per_token_source']})")
    print(f"  bytes/entry          {plan['bytes_per_entry']:.2f} ({plan['bytes_per_entry_source']})")
    print(f"  bytes/token          {plan['bytes_per_token']:.1f}")
    print(f"  total size           {plan['total_TB']:.2f} TB")
    print(f"  shards               {plan['shards']} of {plan['shard_tokens']} tokens (~{plan['shard_GB']:.2f} GB)")
    print(f"  disk per GPU         {plan['disk_per_gpu_TB']:.2f} TB (+ one shard being written)")
    print(f"  write per GPU        {plan['write_MB_per_s_per_gpu']:.1f} MB/s at {teacher_tokens_per_s:.0f} tokens/s")
    print(f"  teacher time         {plan['hours']:.1f} h per GPU")


def cache_info_command(path: str, json: bool = False, plot: str | None = None, verify: bool = True) -> None:
    """Figures of a teacher-logit cache: tokens, entries, bytes per token / entry, kept mass, fingerprints; and,
    by default, a check of every byte of every finished shard (the checksum of every chunk, consistency, finite
    statistics): a damaged shard is named, with exit code 2.

    Args:
        path: the cache folder.
        json: print one JSON object instead of a table.
        plot: write a PNG histogram of the entries per token to this file.
        verify: read every byte and check the checksums (default); false: the figures only, from the index and a
            sample of the shards (fast on a cache of many TB), saying that nothing was verified.
    """
    import json as json_lib

    if plot:
        from pd_lightning.paths import check_output_file

        check_output_file(plot, "--plot")  # before reading the cache
    if verify:  # first: a damaged shard may also break the figures
        read, damaged = damaged_shards(path)
        if damaged:
            named = "; ".join(f"{file.name} ({why})" for file, why in damaged)
            raise CacheCorruptError(
                f"cache-info: {len(damaged)} of {read} shards of {path} are damaged: {named}; delete "
                f"{'them' if len(damaged) > 1 else 'it'} and {RESUME} (it rewrites the missing shards)"
            )
    info = cache_info(path)
    if verify:
        info["verified"] = True
        info["verification"] = f"every byte of the {read} finished shards read, checksums match"
    else:
        info["verified"] = False
        info["verification"] = "checksums not read: --verify false; run without it to check every byte"
    if plot and info.get("complete"):
        plot_entries_histogram(info, plot)
    if json:
        print(json_lib.dumps(info, default=str))
        return
    for key, value in info.items():
        if key in ("entries_histogram", "verification"):
            continue
        if key == "verified":
            value = f"{value} ({info['verification']})"
        print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
