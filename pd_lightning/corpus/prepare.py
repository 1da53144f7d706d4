"""``pd-lightning prepare``: text files -> token ids -> packed fixed-length sequences in token shards + an index.

Output (``TOKEN_SCHEMA_VERSION`` 2) for ``--output data/demo/tokens.h5``:
    data/demo/tokens.h5            the index the user names: attrs schema_version, tokenizer_fingerprint,
                                   tokenizer_path, vocab_size, seq_len, eos_id, num_tokens (train + val stream
                                   lengths), num_documents, sources, complete, layout="shards", shards (JSON list per
                                   split: file, rows, sha256), and HDF5 virtual datasets /train, /val over the shards.
    data/demo/tokens.shards/       <split>-<k>.<tag>.h5, each (rows, seq_len + 1) int32 (``token_shards.py``);
                                   ``tag`` identifies the inputs and settings, so two runs never mix shards.
    data/demo/tokenizer/           the BPE trained when --tokenizer is not given.
Row i of a split is ``stream[i*L : i*L + L + 1]``: inputs row[:-1], next-token labels row[1:]; rows overlap by one
token. A split's stream is its documents' ids, each followed by EOS, in input order. A document is held out for
validation by a hash of its text (``prepare_worker.is_val``), about ``val_fraction`` of them.

How it runs (bounded memory, parallel, resumable): the inputs are cut into units (``prepare_inputs.py``), tokenized
by ``--workers`` processes into parts under ``tokens.shards/.work-<tag>/`` (``prepare_worker.py``); this process
packs the parts in unit order into shards and records after each finished shard where each split stands
(``state.json``). A killed run, rerun with the same command, keeps the finished parts and shards. The rows depend on
the inputs and settings only, never on ``--workers``. The legacy single-file layout (schema 1) is still read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from pd_lightning.corpus.inputs import (
    BUILTIN,
    CorpusError,
    Unit,
    check_inputs,
    iter_documents,
    pieces,
    plan_units,
)
from pd_lightning.corpus.token_shards import ShardedRows, SplitPacker, write_index
from pd_lightning.corpus.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe, vocab_size_of
from pd_lightning.corpus.workers import SPLITS, PartSpec, init_worker, part_paths, read_part_meta, tokenize_unit
from pd_lightning.paths import WRITE_ERRNOS

TOKEN_SCHEMA_VERSION = 2
FORMAT = 3  # changes whenever the same inputs and settings would give other rows (3: long documents in pieces)
READ_TOKENS = 1 << 22  # tokens of a part read at once while packing (16 MiB)


def _default_workers() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(8, os.cpu_count() or 1))


def _check_output(out: Path, shards_dir: Path, overwrite: bool) -> list[Path]:
    """Refuse an unusable --output before any work; create its folders; return the folders this created."""
    if out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a folder; give a file name such as {str(out / 'tokens.h5')!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"--output {str(out)!r} already exists (pass --overwrite true to replace it)")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"--output {str(out)!r}: {str(ancestor)!r} is a file, not a folder; choose another --output")
    if shards_dir.exists() and not shards_dir.is_dir():
        raise ValueError(
            f"--output {str(out)!r}: {str(shards_dir)!r} (where the shards go) is a file; remove it or rename --output"
        )
    created = [p for p in [shards_dir, *shards_dir.parents] if not p.exists()]
    try:
        shards_dir.mkdir(parents=True, exist_ok=True)
        for folder in (out.parent, shards_dir):
            probe = folder / f".probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as e:
        _remove_created(created)
        raise ValueError(
            f"--output {str(out)!r}: cannot write there ({e.strerror or e}); choose another --output or fix permissions"
        ) from None
    return created


def _remove_created(created: list[Path]) -> None:
    for p in created:  # deepest first
        try:
            p.rmdir()
        except OSError:
            pass


def _input_stats(units: list[Unit]) -> list:
    """What identifies the inputs' content cheaply: each file's size and modification time."""
    stats = []
    for name in dict.fromkeys(u.source for u in units):
        if name == BUILTIN:
            stats.append([BUILTIN, sys.version])
        else:
            st = os.stat(name)
            stats.append([os.path.abspath(name), st.st_size, st.st_mtime_ns])
    return stats


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _trained_tokenizer(units, inputs, text_field, txt_doc_chars, chunk_bytes, vocab_size, work: Path, final: Path):
    """Train the BPE once per corpus: kept in ``work`` (with a ``key.json`` naming the corpus) until prepare succeeds,
    reused by a resumed run, also when a killed run had already moved it to ``final`` but not written its index."""
    key = _key([FORMAT, _input_stats(units), text_field, txt_doc_chars, chunk_bytes, vocab_size])
    for folder in (work, final):
        marker = folder / "key.json"
        if marker.is_file() and json.loads(marker.read_text()) == key:
            if folder != work:
                shutil.rmtree(work, ignore_errors=True)
                os.replace(folder, work)
            return load_tokenizer(work)
    shutil.rmtree(work, ignore_errors=True)
    print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the corpus")
    tmp = work.with_name(work.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    seen = [0]

    def texts():
        for text in iter_documents(inputs, text_field, txt_doc_chars, chunk_bytes):
            seen[0] += 1
            yield from pieces(text)  # the same word counts as the whole text

    tok = train_bpe(texts(), vocab_size, tmp)
    if not seen[0]:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CorpusError(_no_text(inputs))
    (tmp / "key.json").write_text(json.dumps(key))
    os.replace(tmp, work)
    return tok


def prepare(
    input: list[str] | str = "builtin",
    output: str = "data/demo/tokens.h5",
    seq_len: int = 256,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    text_field: str = "text",
    val_fraction: float = 0.05,
    overwrite: bool = False,
    workers: int | None = None,
    shard_tokens: int = 256_000_000,
    chunk_mb: float = 16.0,
    txt_doc_chars: int = 4096,
    batch_documents: int = 256,
) -> dict:
    """Tokenize and pack a text corpus into token shards + an index file, for pre-training and the teacher's cache.

    Args:
        input: corpus files: .txt (split at blank lines into documents of >= --txt_doc_chars characters),
            .jsonl / .jsonl.gz / .jsonl.zst (one document per line, field --text_field), .parquet (one per row of
            column --text_field); or 'builtin' for the embedded corpus (the running Python's documentation).
        output: the index file to write (e.g. data/demo/tokens.h5); the shards go in '<stem>.shards/' next to it.
        seq_len: tokens per training sequence (each stored row holds seq_len + 1 ids).
        tokenizer: a local Hugging Face tokenizer folder (the teacher's). When omitted, a byte-level BPE with
            --vocab_size entries is trained on the corpus and saved in a 'tokenizer' folder next to --output.
        vocab_size: size of the BPE trained when --tokenizer is omitted.
        text_field: field of .jsonl records / column of .parquet files that holds the text.
        val_fraction: fraction of documents held out for validation (by a hash of their text).
        overwrite: replace an existing --output (and trained tokenizer).
        workers: tokenizing processes (default: the CPUs available, at most 8; 0 = in this process).
            The rows do not depend on it.
        shard_tokens: at most this many tokens per shard file (4 bytes each: 256M = 1 GiB).
        chunk_mb: large .txt / .jsonl files are cut into pieces of this many MiB, tokenized in parallel; one
            piece is the unit of resumption and bounds a worker's memory. The rows depend on it.
        txt_doc_chars: a .txt file is split at blank lines into documents of at least this many characters
            (each followed by EOS), so a single large .txt file still gets a validation part.
        batch_documents: documents tokenized per batch.
    """
    inputs = [input] if isinstance(input, str) else list(input)
    for flag, value in (("--seq_len", seq_len), ("--shard_tokens", shard_tokens), ("--txt_doc_chars", txt_doc_chars)):
        if value <= 0:
            raise ValueError(f"{flag} must be positive, got {value}")
    if not chunk_mb > 0:
        raise ValueError(f"--chunk_mb must be positive, got {chunk_mb}")
    if batch_documents <= 0:
        raise ValueError(f"--batch_documents must be positive, got {batch_documents}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction must lie in [0, 1), got {val_fraction}")
    workers = _default_workers() if workers is None else workers
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    out = Path(output)
    shards_dir = out.parent / f"{out.stem}.shards"
    tok_final = out.parent / "tokenizer"
    check_inputs(inputs, text_field)
    if out.is_file() and not overwrite:
        raise FileExistsError(f"--output {str(out)!r} already exists (pass --overwrite true to replace it)")
    # A tokenizer/ with a key.json was moved there by a prepare killed before it wrote its index: not the user's.
    if tokenizer is None and tok_final.exists() and not overwrite and not (tok_final / "key.json").is_file():
        raise FileExistsError(
            f"tokenizer folder {str(tok_final)!r} already exists (pass --overwrite true or --tokenizer {tok_final})"
        )
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
        if tok.eos_token_id is None:
            raise ValueError(f"--tokenizer {tokenizer!r} has no EOS token; documents cannot be joined")
    created = _check_output(out, shards_dir, overwrite)
    chunk_bytes = max(1, int(chunk_mb * (1 << 20)))
    tok_work = shards_dir / ".tokenizer"
    try:
        units = plan_units(inputs, chunk_bytes, text_field)
        if tokenizer is None:
            tok = _trained_tokenizer(
                units, inputs, text_field, txt_doc_chars, chunk_bytes, vocab_size, tok_work, tok_final
            )
        shard_rows = max(1, shard_tokens // (seq_len + 1))
        settings = [FORMAT, _input_stats(units), [list(vars(u).values()) for u in units], tokenizer_fingerprint(tok)]
        settings += [seq_len, val_fraction, text_field, txt_doc_chars, shard_rows]
        tag = _key(settings)[:12]
        work = shards_dir / f".work-{tag}"
        for stale in shards_dir.glob(".work-*"):
            if stale != work:
                print(f"discarding {stale}: an unfinished prepare of other inputs or settings")
                shutil.rmtree(stale, ignore_errors=True)
        work.joinpath("parts").mkdir(parents=True, exist_ok=True)
        spec = PartSpec(
            str(work / "parts"), tok.backend_tokenizer.to_str(), int(tok.eos_token_id), text_field, val_fraction,
            txt_doc_chars, batch_documents,
        )  # fmt: skip
        committed = _pack_all(units, spec, work, shards_dir, tag, seq_len, shard_rows, workers)
        return _finish(
            out, shards_dir, tok, tokenizer, tok_work, tok_final, work, committed, created, inputs, seq_len,
            val_fraction,
        )  # fmt: skip
    except CorpusError:
        _discard(out, shards_dir, tok_work, created)
        raise
    except OSError as e:  # a full disk (or another write error) met by this process or a worker
        where = f" {str(e.filename)!r}" if e.filename else f" under --output {str(out)!r}"
        what = f"cannot write{where}: {WRITE_ERRNOS[e.errno]}" if e.errno in WRITE_ERRNOS else ""
        what = what or f"{where.strip() or 'error'}: {e.strerror or str(e).splitlines()[0]}"
        todo = "free space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix it"
        raise ValueError(
            f"prepare stopped: {what}; {todo} and rerun the same command (the finished shards and tokenized parts "
            "are kept)"
        ) from None


def _pack_all(units, spec: PartSpec, work, shards_dir, tag, seq_len, shard_rows, workers) -> dict:
    """Tokenize the units not yet done (in ``workers`` processes) and pack every part, in unit order, into shards."""
    parts = Path(spec.parts_dir)
    for stale in parts.glob("*.tmp*"):
        stale.unlink(missing_ok=True)
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    metas = [read_part_meta(parts, i) for i in range(len(units))]
    start = _resume_points(state, metas) if state else None
    if start is None:  # a fresh run (or an unreadable state): every shard of this tag is redone
        state, start = {s: {"g": 0, "shards": []} for s in SPLITS}, {s: (0, 0) for s in SPLITS}
    packers = {s: SplitPacker(s, seq_len, shard_rows, shards_dir, tag, state[s]) for s in SPLITS}
    first = min(u for u, _ in start.values())

    def ready(u: int) -> bool:
        if metas[u] is None:
            return False
        for s in SPLITS:
            path = part_paths(parts, u)[s]
            if u >= start[s][0] and not (path.is_file() and path.stat().st_size == 4 * metas[u][f"{s}_tokens"]):
                return False
        return True

    pending = [u for u in range(first, len(units)) if not ready(u)]
    done = len(units) - len(pending)
    if state["train"]["shards"] or done:
        print(
            f"resuming: {done} of {len(units)} input parts already tokenized, {len(state['train']['shards'])} train "
            f"+ {len(state['val']['shards'])} val shards already written"
        )
    jobs = [(u, units[u]) for u in pending]
    pool = None
    if workers >= 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: the workers do not inherit this process's threads (Rust tokenizer, torch); an executor (unlike
        # multiprocessing.Pool) raises instead of hanging when a worker dies.
        pool = ProcessPoolExecutor(
            min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
            initargs=(spec,),
        )  # fmt: skip
        results = _worker_results(pool.map(tokenize_unit, jobs))
    # The bar counts input bytes, or documents when the embedded corpus (of unknown size) is among the inputs.
    by_docs = any(u.kind == BUILTIN for u in units)
    total = None if by_docs else sum(u.size for u in units)
    bar = tqdm(total=total, unit=" docs" if by_docs else "B", unit_scale=not by_docs, desc="tokenizing",
               mininterval=1.0, delay=1.0)  # fmt: skip
    if pool is None:  # in this process: the bar moves with every batch of documents
        init_worker(spec, single_threaded=False, progress=bar.update if by_docs else None)
        results = map(tokenize_unit, jobs)
    # Per split: the first unit whose part file is not deleted yet, and the stream offset where that unit begins.
    kept = {s: [first, _offset_before(metas, s, first)] for s in SPLITS}
    tokens = 0
    try:
        pending_set = set(pending)
        for u in range(first, len(units)):
            if u in pending_set:
                metas[u] = next(results)
            for s in SPLITS:
                su, so = start[s]
                if u >= su:
                    _feed_part(packers[s], part_paths(parts, u)[s], so if u == su else 0)
            if not by_docs:
                bar.update(metas[u]["size"])
            elif pool is not None or u not in pending_set:
                bar.update(metas[u]["documents"])
            tokens += metas[u]["train_tokens"] + metas[u]["val_tokens"]
            bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
            if any(p.changed for p in packers.values()):
                _save_state(state_path, packers)
                _delete_consumed(parts, metas, packers, kept, u)
        for p in packers.values():
            p.close()
        _save_state(state_path, packers)
    except BaseException:
        bar.leave = False  # the error message stays the only line
        if pool is not None:  # stop the units still being tokenized now, not when they end
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        raise
    finally:
        bar.close()
        for p in packers.values():
            p.abandon()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return {s: packers[s].committed for s in SPLITS} | {"metas": metas}


def _worker_results(results):
    from concurrent.futures.process import BrokenProcessPool

    try:
        yield from results
    except BrokenProcessPool:
        raise RuntimeError(
            "a prepare worker process died (out of memory? or prepare() was called from a script without "
            "`if __name__ == '__main__':`); rerun with the same command to resume, or with --workers 0"
        ) from None


def _offset_before(metas, split: str, u: int) -> int:
    return sum(m[f"{split}_tokens"] for m in metas[:u])


def _resume_points(state: dict, metas: list) -> dict | None:
    """Per split, (unit, offset in its part) where the committed carry starts; None if the parts do not match."""
    points = {}
    for s in SPLITS:
        g, cum, u = int(state[s]["g"]), 0, 0
        while u < len(metas) and metas[u] is not None and cum + metas[u][f"{s}_tokens"] <= g:
            cum += metas[u][f"{s}_tokens"]
            u += 1
        if cum + (metas[u][f"{s}_tokens"] if u < len(metas) and metas[u] else 0) < g:
            return None
        points[s] = (u, g - cum)
    return points


def _feed_part(packer: SplitPacker, path: Path, offset: int) -> None:
    total = path.stat().st_size // 4
    for at in range(offset, total, READ_TOKENS):
        packer.feed(np.fromfile(path, dtype="<i4", count=min(READ_TOKENS, total - at), offset=4 * at))


def _save_state(path: Path, packers: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({s: p.committed for s, p in packers.items()}))
    os.replace(tmp, path)
    for p in packers.values():
        p.changed = False


def _delete_consumed(parts: Path, metas, packers, kept: dict, upto: int) -> None:
    """Remove the part files every committed position has moved past (their rows are in finished shards)."""
    for s, p in packers.items():
        u, begin = kept[s]
        while u <= upto and begin + metas[u][f"{s}_tokens"] <= p.committed["g"]:
            begin += metas[u][f"{s}_tokens"]
            part_paths(parts, u)[s].unlink(missing_ok=True)
            u += 1
        kept[s] = [u, begin]


def _discard(out: Path, shards_dir: Path, tok_work: Path, created: list[Path]) -> None:
    """After bad input: remove this run's work and the shards no existing index lists, and the folders it made."""
    for p in shards_dir.glob(".work-*"):
        shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(tok_work, ignore_errors=True)
    shutil.rmtree(tok_work.with_name(tok_work.name + ".tmp"), ignore_errors=True)
    keep = set()
    try:
        with h5py.File(out, "r") as f:
            keep = {Path(e["file"]).name for v in json.loads(f.attrs["shards"]).values() for e in v}
    except (OSError, KeyError, ValueError):
        pass
    for shard in [*shards_dir.glob("*.h5"), *shards_dir.glob("*.h5.tmp")]:
        if shard.name not in keep:
            shard.unlink(missing_ok=True)
    _remove_created(created)


def _no_text(inputs: list[str]) -> str:
    names = ", ".join(repr(name) for name in inputs)
    return (
        f"--input {names}: no text: every document is blank (empty, or only spaces and line breaks), so there is "
        "nothing to tokenize; check the file(s) and --text_field"
    )


def _finish(
    out, shards_dir, tok, tokenizer, tok_work, tok_final, work, committed, created, inputs, seq_len, val_fraction
) -> dict:
    metas = committed.pop("metas")
    if not sum(m["documents"] for m in metas):
        raise CorpusError(_no_text(inputs))  # the caller removes this run's work
    rows = {s: sum(e["rows"] for e in committed[s]["shards"]) for s in SPLITS}
    if rows["train"] == 0:
        total = sum(m["train_tokens"] for m in metas)
        _discard(out, shards_dir, tok_work, created)
        raise ValueError(f"--seq_len {seq_len}: the training part has only {total} tokens, less than one sequence")
    if tokenizer is None:
        shutil.rmtree(tok_final, ignore_errors=True)
        os.replace(tok_work, tok_final)  # its key.json goes with it and is removed once the index is written
        tok_dir = tok_final
    else:
        tok_dir = Path(tokenizer)
    attrs = dict(
        schema_version=TOKEN_SCHEMA_VERSION,
        tokenizer_fingerprint=tokenizer_fingerprint(tok),
        tokenizer_path=os.path.relpath(tok_dir.resolve(), out.parent.resolve()),  # relative to the index
        vocab_size=vocab_size_of(tok),
        seq_len=seq_len,
        eos_id=int(tok.eos_token_id),
        num_tokens=int(sum(m["train_tokens"] + m["val_tokens"] for m in metas)),
        num_documents=int(sum(m["documents"] for m in metas)),
        sources=json.dumps(inputs),
        complete=True,
    )
    write_index(out, attrs, {s: committed[s]["shards"] for s in SPLITS}, shards_dir, seq_len)
    if tokenizer is None:
        (tok_final / "key.json").unlink(missing_ok=True)
    keep = {e["file"] for s in SPLITS for e in committed[s]["shards"]}
    for old in shards_dir.glob("*.h5"):  # shards of the output this one replaced
        if old.name not in keep:
            old.unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    summary = {**attrs, "train_sequences": rows["train"], "val_sequences": rows["val"]}
    n_shards = len(keep)
    print(
        f"wrote {out} ({n_shards} shard{'s' if n_shards != 1 else ''} in {shards_dir}): {rows['train']} train + "
        f"{rows['val']} val sequences of {seq_len} tokens ({attrs['num_tokens']:,} tokens from "
        f"{attrs['num_documents']:,} documents, vocab {attrs['vocab_size']})"
    )
    if rows["val"] == 0 and val_fraction > 0:
        n_docs, val_tokens = attrs["num_documents"], sum(m["val_tokens"] for m in metas)
        why = (
            f"the held-out documents hold {val_tokens} tokens, less than one sequence of --seq_len {seq_len} + 1"
            if val_tokens
            else f"none of its {n_docs:,} document{'s' if n_docs != 1 else ''} was held out: documents are held "
            f"out whole, about --val_fraction {val_fraction} of them (by a hash of their text)"
        )
        print(
            f"warning: {out}: no validation sequences ({why}); `fit` on it needs another validation token file or "
            "--trainer.limit_val_batches 0. For a validation split give more documents (a .jsonl line or "
            ".parquet row is one; .txt files are cut at blank lines into documents of --txt_doc_chars characters, "
            "a text without blank lines stays one document) or raise --val_fraction",
            file=sys.stderr,
        )
    return summary


class TokenFile:
    """Read-only view of a token file (an index over shards, or a legacy single file), opened lazily.

    ``rows(split, index)`` gives one row (L + 1,) for an int, (n, L + 1) for a slice or an index array; the object
    is safe to pickle into DataLoader workers (open files are not pickled).
    """

    def __init__(self, path: str | os.PathLike, flag: str = "--data.path") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            what = "is a folder, not a token file" if self.path.is_dir() else "does not exist"
            raise FileNotFoundError(f"{flag}: token file {str(self.path)!r} {what} (run `pd-lightning prepare`)")
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
                legacy_lengths = {s: (f[s].shape[0] if s in f else 0) for s in SPLITS}
        except OSError as e:
            raise ValueError(f"{flag}: {str(self.path)!r} is not a readable HDF5 token file ({e})") from None
        if "teacher_fingerprint" in self.attrs:
            raise ValueError(
                f"{flag}: {str(self.path)!r} is a teacher-cache shard, not a token file (give the token file written "
                "by `pd-lightning prepare`, e.g. data/demo/tokens.h5; a cache is read by the cache data module)"
            )
        if not self.attrs.get("complete"):
            raise ValueError(f"{flag}: token file {str(self.path)!r} is incomplete; run `pd-lightning prepare` again")
        for key in ("seq_len", "vocab_size", "tokenizer_fingerprint"):
            if key not in self.attrs:
                raise ValueError(f"{flag}: {str(self.path)!r} is not a token file of `pd-lightning prepare` (no {key})")
        self.seq_len = int(self.attrs["seq_len"])
        self.vocab_size = int(self.attrs["vocab_size"])
        self.fingerprint = str(self.attrs["tokenizer_fingerprint"])
        self.tokenizer_path = str((self.path.parent / str(self.attrs.get("tokenizer_path", ""))).resolve())
        self.sharded: ShardedRows | None = None
        if self.attrs.get("layout") == "shards":
            self.sharded = ShardedRows(self.path, str(self.attrs["shards"]), self.seq_len, flag)
            self.lengths = {s: self.sharded.length(s) for s in SPLITS}
        else:
            self.lengths = legacy_lengths
        self._file: h5py.File | None = None
        self._dsets: dict[str, h5py.Dataset] = {}

    def rows(self, split: str, index) -> np.ndarray:
        if self.sharded is not None:
            return self.sharded.rows(split, index)
        if self._file is None:
            self._file = h5py.File(self.path, "r")
            self._dsets = {s: self._file[s] for s in SPLITS if s in self._file}
        return self._dsets[split][index]

    def verify(self) -> None:
        """Recompute every shard's checksum (reads everything); a legacy file has none to check."""
        if self.sharded is not None:
            self.sharded.verify()

    def close(self) -> None:
        """Close the files opened by ``rows`` (they reopen on the next read)."""
        if self.sharded is not None:
            self.sharded.close()
        if self._file is not None:
            self._file.close()
            self._file, self._dsets = None, {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None, "_dsets": {}}
