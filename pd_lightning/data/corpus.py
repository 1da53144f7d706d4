"""``pd-lightning prepare``: text files -> token ids -> packed fixed-length sequences in one HDF5 file.

Layout of the token file (``TOKEN_SCHEMA_VERSION``):
    /train, /val   (n, seq_len + 1) int32; sample i has inputs row[:-1] and next-token labels row[1:].
                   Rows overlap by one token (row i = stream[i*L : i*L + L + 1]), so no token is lost.
    attrs          schema_version, tokenizer_fingerprint, tokenizer_path, vocab_size, seq_len, eos_id,
                   num_tokens (train + val stream lengths), num_documents, sources, complete.
Documents are joined with EOS after each one; a deterministic hash of the document index puts about
``val_fraction`` of the documents in the held-out part.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from pd_lightning.data.tokenizer import load_tokenizer, tokenizer_fingerprint, train_bpe, vocab_size_of

TOKEN_SCHEMA_VERSION = 1
BUILTIN = "builtin"


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{lineno}: no {text_field!r} field (set --text_field)")
            yield str(record[text_field])


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names}; set --text_field)")
    for batch in table.iter_batches(columns=[text_field]):
        yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)


def check_inputs(inputs: list[str]) -> list[Path]:
    if not inputs:
        raise ValueError("--input: no corpus given (a file, several files, or 'builtin')")
    paths = []
    for name in inputs:
        if name == BUILTIN:
            continue
        p = Path(name)
        if not p.is_file():
            raise FileNotFoundError(f"--input: corpus file {name!r} does not exist")
        if p.stat().st_size == 0:
            raise ValueError(f"--input: corpus file {name!r} is empty")
        if p.suffix not in (".txt", ".jsonl", ".parquet"):
            raise ValueError(f"--input: {name!r} has unsupported suffix {p.suffix!r} (use .txt, .jsonl or .parquet)")
        paths.append(p)
    return paths


def iter_documents(inputs: list[str], text_field: str = "text") -> Iterator[str]:
    """Every document of every input: a whole .txt file, a .jsonl line's field, a .parquet row's column."""
    for name in inputs:
        if name == BUILTIN:
            from pd_lightning.data.builtin_corpus import builtin_documents

            yield from builtin_documents()
            continue
        p = Path(name)
        if p.suffix == ".txt":
            yield p.read_text(encoding="utf-8")
        elif p.suffix == ".jsonl":
            yield from _read_jsonl(p, text_field)
        else:
            yield from _read_parquet(p, text_field)


def _is_val(doc_index: int, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(doc_index.to_bytes(8, "little"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < val_fraction * 1_000_000


def _pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    n = (len(stream) - 1) // seq_len
    if n <= 0:
        return np.zeros((0, seq_len + 1), dtype=np.int32)
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


def prepare(
    input: list[str] | str = "builtin",
    output: str = "data/demo/tokens.h5",
    seq_len: int = 512,
    tokenizer: str | None = None,
    vocab_size: int = 4096,
    text_field: str = "text",
    val_fraction: float = 0.05,
    overwrite: bool = False,
    batch_documents: int = 256,
) -> dict:
    """Tokenize and pack a text corpus into an HDF5 token file for pre-training and for the teacher's cache.

    Args:
        input: corpus files (.txt = one document, .jsonl = one document per line, .parquet = one per row),
            or 'builtin' for the embedded default corpus (the running Python's documentation and docstrings).
        output: the token file to write (HDF5, e.g. data/demo/tokens.h5).
        seq_len: tokens per training sequence (each stored row holds seq_len + 1 ids).
        tokenizer: a local Hugging Face tokenizer folder (the teacher's). When omitted, a byte-level BPE with
            --vocab_size entries is trained on the corpus and saved in a 'tokenizer' folder next to --output.
        vocab_size: size of the BPE trained when --tokenizer is omitted.
        text_field: field of .jsonl records / column of .parquet files that holds the text.
        val_fraction: fraction of documents held out for validation.
        overwrite: replace an existing --output (and trained tokenizer).
        batch_documents: documents tokenized per batch.
    """
    input = [input] if isinstance(input, str) else list(input)
    if seq_len <= 0:
        raise ValueError(f"--seq_len must be positive, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val_fraction must lie in [0, 1), got {val_fraction}")
    out = Path(output)
    if out.exists() and not overwrite:
        raise FileExistsError(f"--output {str(out)!r} already exists (pass --overwrite to replace it)")
    check_inputs(input)
    out.parent.mkdir(parents=True, exist_ok=True)

    if tokenizer is None:
        tok_dir = out.parent / "tokenizer"
        if tok_dir.exists() and not overwrite:
            raise FileExistsError(f"tokenizer folder {str(tok_dir)!r} already exists (pass --overwrite or --tokenizer)")
        print(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the corpus -> {tok_dir}")
        tok = train_bpe(iter_documents(input, text_field), vocab_size, tok_dir)
    else:
        tok_dir = Path(tokenizer)
        tok = load_tokenizer(tok_dir)
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"--tokenizer {str(tok_dir)!r} has no EOS token; documents cannot be joined")

    streams: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    n_docs = 0
    batch: list[tuple[int, str]] = []
    backend = tok.backend_tokenizer

    def flush() -> None:
        encodings = backend.encode_batch([text for _, text in batch], add_special_tokens=False)
        for (index, _), enc in zip(batch, encodings):
            ids = np.asarray(enc.ids + [eos], dtype=np.int32)
            streams["val" if _is_val(index, val_fraction) else "train"].append(ids)
        batch.clear()

    for text in tqdm(iter_documents(input, text_field), desc="tokenizing", unit=" docs", mininterval=1.0):
        if text.strip():
            batch.append((n_docs, text))
            n_docs += 1
        if len(batch) >= batch_documents:
            flush()
    if batch:
        flush()
    if n_docs == 0:
        raise ValueError(f"--input {input}: the corpus holds no text")

    packed = {}
    for split, parts in streams.items():
        stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        packed[split] = _pack(stream, seq_len)
    if len(packed["train"]) == 0:
        total = sum(len(p) for p in streams["train"])
        raise ValueError(f"--seq_len {seq_len}: the training part has only {total} tokens, less than one sequence")

    # Write next to the destination, then rename: an interrupted run never leaves a half-written --output.
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for split, rows in packed.items():
            f.create_dataset(split, data=rows, chunks=(max(1, min(len(rows), 64)), seq_len + 1) if len(rows) else None)
        attrs = dict(
            schema_version=TOKEN_SCHEMA_VERSION,
            tokenizer_fingerprint=tokenizer_fingerprint(tok),
            tokenizer_path=os.path.relpath(tok_dir.resolve(), out.parent.resolve()),  # relative to the token file
            vocab_size=vocab_size_of(tok),
            seq_len=seq_len,
            eos_id=eos,
            num_tokens=int(sum(len(p) for parts in streams.values() for p in parts)),
            num_documents=n_docs,
            sources=json.dumps(input),
            complete=True,
        )
        f.attrs.update(attrs)
    os.replace(tmp, out)
    summary = {**attrs, "train_sequences": len(packed["train"]), "val_sequences": len(packed["val"])}
    print(
        f"wrote {out}: {summary['train_sequences']} train + {summary['val_sequences']} val sequences of {seq_len} "
        f"tokens ({summary['num_tokens']:,} tokens from {n_docs:,} documents, vocab {summary['vocab_size']})"
    )
    return summary


class TokenFile:
    """Read-only view of a token file, opened lazily (safe to pickle into DataLoader workers)."""

    def __init__(self, path: str | os.PathLike, flag: str = "--data.path") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{flag}: token file {str(self.path)!r} does not exist (run `pd-lightning prepare`)"
            )
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
                self.lengths = {s: (f[s].shape[0] if s in f else 0) for s in ("train", "val")}
        except OSError as e:
            raise ValueError(f"{flag}: {str(self.path)!r} is not a readable HDF5 token file ({e})") from None
        if not self.attrs.get("complete"):
            raise ValueError(f"{flag}: token file {str(self.path)!r} is incomplete; run `pd-lightning prepare` again")
        self.seq_len = int(self.attrs["seq_len"])
        self.vocab_size = int(self.attrs["vocab_size"])
        self.fingerprint = str(self.attrs["tokenizer_fingerprint"])
        self.tokenizer_path = str((self.path.parent / str(self.attrs.get("tokenizer_path", ""))).resolve())
        self._file: h5py.File | None = None

    def rows(self, split: str, index) -> np.ndarray:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
        return self._file[split][index]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}
