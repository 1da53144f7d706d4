"""Worker side of ``pd-lightning prepare``: tokenize one unit of input into a *part* (two flat int32 streams).

A part of unit ``u`` is ``u.train.bin`` and ``u.val.bin`` (every document's ids followed by EOS, in order, raw
little-endian int32) and ``u.json`` (token and document counts), written to temporary names and renamed, the
``.json`` last: a part whose ``.json`` exists is complete. Memory is one batch of documents, whatever the unit's
size; a document of more than ``2 * PIECE_CHARS`` characters is encoded in pieces (``prepare_inputs.pieces``).
Runs in a worker process (``spawn``) or, with ``--workers 0``, in the calling one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from pd_lightning.corpus.inputs import PIECE_CHARS, Unit, pieces, unit_documents

SPLITS = ("train", "val")
BATCH_CHARS = 1 << 20  # characters of text encoded per batch


def is_val(text: str, val_fraction: float) -> bool:
    """Whether a document is held out: blake2b of its UTF-8 text, so the split depends on the content only (not on
    its position, the worker count or the unit cut), and duplicated documents always land on the same side."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


@dataclass(frozen=True)
class PartSpec:
    """What a worker needs besides the unit: where parts go and how documents become ids."""

    parts_dir: str
    tokenizer_json: str
    eos_id: int
    text_field: str
    val_fraction: float
    txt_doc_chars: int
    batch_documents: int


_WORKER: tuple | None = None  # per process: the spec, its tokenizer, the progress callback


def init_worker(spec: PartSpec, single_threaded: bool = True, progress=None) -> None:
    """Set this process up for ``tokenize_unit`` (the spec travels once per process, not once per unit).

    ``single_threaded``: one tokenizer thread per worker, so ``--workers`` is the parallelism (in a worker process
    this is set before the Rust tokenizer is loaded). ``progress(n)``: called after each batch of n documents."""
    global _WORKER
    if single_threaded:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER = (spec, Tokenizer.from_str(spec.tokenizer_json), progress)


def part_paths(parts_dir: str | os.PathLike, index: int) -> dict[str, Path]:
    base = Path(parts_dir) / f"{index:06d}"
    return {
        "train": base.with_suffix(".train.bin"),
        "val": base.with_suffix(".val.bin"),
        "meta": base.with_suffix(".json"),
    }


def read_part_meta(parts_dir: str | os.PathLike, index: int) -> dict | None:
    """The counts of a finished part, or None when it was never finished."""
    meta = part_paths(parts_dir, index)["meta"]
    try:
        return json.loads(meta.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def tokenize_unit(job: tuple[int, Unit]) -> dict:
    """Tokenize unit ``index`` into its part (after ``init_worker``); return the part's counts.

    A write that fails (a full disk) raises ``OSError`` naming the part's folder, after removing the unfinished
    files (the finished parts of other units stay: a rerun resumes with them)."""
    index, unit = job
    spec = _WORKER[0]
    paths = part_paths(spec.parts_dir, index)
    suffix = f".tmp{os.getpid()}"  # unique: a stale worker of a killed run may still be writing the same part
    tmp = {name: path.with_name(path.name + suffix) for name, path in paths.items()}
    try:
        counts = _write_part(unit, tmp)
        for s in SPLITS:
            os.replace(tmp[s], paths[s])
        tmp["meta"].write_text(json.dumps(counts))
        os.replace(tmp["meta"], paths["meta"])
    except OSError as e:
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if e.filename is None:  # a failed write() does not say which file it was writing
            raise OSError(e.errno, e.strerror, spec.parts_dir) from None
        raise
    return counts


def _write_part(unit: Unit, tmp: dict[str, Path]) -> dict:
    """The ids of the unit's documents into ``tmp["train"]`` / ``tmp["val"]``; their counts.

    Short documents are encoded in batches (``batch_documents`` or ``BATCH_CHARS``); a document longer than
    ``2 * PIECE_CHARS`` characters is encoded in pieces (``prepare_inputs.pieces``), a few at a time, so memory does
    not grow with the longest document. It stays one document: one EOS after it, held out or not as a whole."""
    spec, tok, progress = _WORKER
    counts = {"train_tokens": 0, "val_tokens": 0, "documents": 0, "size": unit.size}
    eos = np.asarray([spec.eos_id], dtype=np.int32)
    batch: list[str] = []
    chars = 0
    with open(tmp["train"], "wb") as f_train, open(tmp["val"], "wb") as f_val:
        files = {"train": f_train, "val": f_val}

        def write(split: str, ids) -> None:
            files[split].write(np.asarray(ids, dtype="<i4").tobytes())
            counts[f"{split}_tokens"] += len(ids)

        def flush() -> None:
            for text, enc in zip(batch, tok.encode_batch(batch, add_special_tokens=False)):
                split = "val" if is_val(text, spec.val_fraction) else "train"
                write(split, enc.ids)
                write(split, eos)
            counts["documents"] += len(batch)
            if progress is not None:
                progress(len(batch))
            batch.clear()

        def long_document(text: str) -> None:
            split = "val" if is_val(text, spec.val_fraction) else "train"
            group: list[str] = []
            for piece in chain(pieces(text), [None]):
                if group and (piece is None or sum(map(len, group)) + len(piece) > BATCH_CHARS):
                    for enc in tok.encode_batch(group, add_special_tokens=False):
                        write(split, enc.ids)
                    group.clear()
                if piece is not None:
                    group.append(piece)
            write(split, eos)
            counts["documents"] += 1
            if progress is not None:
                progress(1)

        for text in unit_documents(unit, spec.text_field, spec.txt_doc_chars):
            if not text.strip():
                continue
            if len(text) > 2 * PIECE_CHARS:
                if batch:
                    flush()
                    chars = 0
                long_document(text)
                continue
            batch.append(text)
            chars += len(text)
            if len(batch) >= spec.batch_documents or chars >= BATCH_CHARS:
                flush()
                chars = 0
        if batch:
            flush()
    return counts
