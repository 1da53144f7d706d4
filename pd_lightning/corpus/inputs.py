"""Corpus inputs of ``pd-lightning prepare``: checking them, cutting them into work units, reading documents.

A *unit* is the piece of input one worker tokenizes at once. The cut depends only on the inputs and
``chunk_bytes``, never on the number of workers, so every worker count yields the same documents in the same order:
    .txt          byte ranges of ~``chunk_bytes``, cut just after a blank line (b"\\n\\n" or b"\\n\\r\\n");
                  inside a range the text is split into documents at blank lines, each document gathering
                  paragraphs until it holds at least ``txt_doc_chars`` characters (a shorter file is one document).
    .jsonl        byte ranges of ~``chunk_bytes``, cut just after a newline; one document per line.
    .jsonl.gz/.zst  one unit per file (compressed streams cannot be entered in the middle), read as a stream.
    .parquet      one unit per row group; one document per row of column ``text_field`` (nulls skipped).
    builtin       the embedded corpus (``builtin_corpus.py``), ``BUILTIN_FILES`` of its sources per unit.
Reading is streaming: a unit never holds more than its own range in memory (compressed files: one line).
"""

from __future__ import annotations

import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUILTIN = "builtin"
BUILTIN_FILES = 200  # sources of the embedded corpus per unit
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_MAGIC = {".jsonl.gz": b"\x1f\x8b", ".jsonl.zst": b"\x28\xb5\x2f\xfd"}
_TXT_BOUNDARY = re.compile(rb"(?<=\n)\r?\n")  # a unit starts right after a blank line
_LINE_BOUNDARY = re.compile(rb"\n")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class CorpusError(ValueError):
    """An input file that cannot be read as a corpus; the message names the file (and line where known)."""


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``source`` (a path or 'builtin') of ``kind``, part ``start``..``stop`` of it.

    For .txt / .jsonl, ``start``/``stop`` are nominal byte offsets (the real cut moves to the next boundary);
    for .parquet they are row-group indices; otherwise 0, 0.
    """

    source: str
    kind: str
    start: int
    stop: int
    size: int  # bytes of input it covers, for the progress bar


def suffix_of(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix


def check_inputs(inputs: list[str], text_field: str = "text") -> list[Path]:
    """Refuse missing, empty, unsupported or mislabelled inputs before any work starts."""
    if not inputs:
        raise ValueError("--input: no corpus given (a file, several files, or 'builtin')")
    paths = []
    for name in inputs:
        if name == BUILTIN:
            continue
        p = Path(name)
        if not p.is_file():
            what = "is a folder, not a file (give the files in it)" if p.is_dir() else "does not exist"
            raise FileNotFoundError(f"--input: corpus file {name!r} {what}")
        if p.stat().st_size == 0:
            raise ValueError(f"--input: corpus file {name!r} is empty")
        suffix = suffix_of(p)
        if suffix not in SUFFIXES:
            raise ValueError(f"--input: {name!r} has unsupported suffix {suffix!r} (use {', '.join(SUFFIXES)})")
        try:
            with p.open("rb") as f:
                head = f.read(4)
        except OSError as e:
            raise ValueError(f"--input: cannot read {name!r} ({e.strerror})") from None
        magic = _MAGIC.get(suffix)
        if magic and not head.startswith(magic):
            raise CorpusError(f"--input: {name!r} is not a {suffix[len('.jsonl.') :]} file (wrong magic bytes)")
        if suffix == ".parquet":
            _parquet_file(p, text_field)
        paths.append(p)
    return paths


def _parquet_file(path: Path, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"--input: {str(path)!r} is not a readable Parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise CorpusError(
            f"{str(path)!r}: no column {text_field!r} (columns: {pf.schema_arrow.names}; set --text_field)"
        )
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{str(path)!r}: column {text_field!r} holds {kind}, not strings (set --text_field)")
    return pf


def plan_units(inputs: list[str], chunk_bytes: int, text_field: str = "text") -> list[Unit]:
    """The units of all inputs, in input order (then file order)."""
    units = []
    for name in inputs:
        if name == BUILTIN:
            from pd_lightning.corpus.builtin import builtin_sources

            n = len(builtin_sources())
            units.extend(Unit(BUILTIN, BUILTIN, a, min(a + BUILTIN_FILES, n), 1) for a in range(0, n, BUILTIN_FILES))
            continue
        p = Path(name)
        kind, size = suffix_of(p), p.stat().st_size
        if kind in (".txt", ".jsonl"):
            for start in range(0, size, chunk_bytes):
                units.append(Unit(name, kind, start, min(start + chunk_bytes, size), min(chunk_bytes, size - start)))
        elif kind == ".parquet":
            pf = _parquet_file(p, text_field)
            n = pf.metadata.num_row_groups
            for g in range(n):
                units.append(Unit(name, kind, g, g + 1, max(1, size // max(n, 1))))
        else:
            units.append(Unit(name, kind, 0, 0, size))
    return units


def _boundary_at_or_after(f, pos: int, pattern: re.Pattern, lookback: int, size: int) -> int:
    """The first cut position >= ``pos`` (0 stays 0; EOF if there is none), scanning forward in 1 MiB blocks."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    block = 1 << 20
    scan = max(0, pos - lookback)
    while scan < size:
        f.seek(scan)
        data = f.read(block + lookback)
        for m in pattern.finditer(data):
            if scan + m.end() >= pos:
                return scan + m.end()
        if len(data) < block + lookback:
            break
        scan += block
    return size


def _decode(data: bytes, path: str, offset: int) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path!r}: not UTF-8 text at byte {offset + e.start} (convert the file to UTF-8)") from None


def _line_number(path: str, offset: int) -> int:
    """1-based line number of byte ``offset`` (counted only to report an error)."""
    count, done = 1, 0
    with open(path, "rb") as f:
        while done < offset:
            data = f.read(min(1 << 24, offset - done))
            if not data:
                break
            count += data.count(b"\n")
            done += len(data)
    return count


def _record_text(line: str, text_field: str, where: str) -> str | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        raise CorpusError(f"{where}: no {text_field!r} field (set --text_field)")
    value = record[text_field]
    if value is not None and not isinstance(value, str):
        kind = {list: "array", dict: "object", bool: "boolean"}.get(type(value), "number")
        raise CorpusError(f"{where}: field {text_field!r} is a JSON {kind}, not a string (set --text_field)")
    return value


def txt_documents(text: str, txt_doc_chars: int) -> Iterator[str]:
    """Split ``text`` at blank lines into documents of at least ``txt_doc_chars`` characters (the last may be
    shorter); the text between two cuts is kept exactly, the blank lines at a cut are dropped."""
    start = 0
    for m in _PARAGRAPH_BREAK.finditer(text):
        if m.start() - start >= txt_doc_chars:
            yield text[start : m.start()]
            start = m.end()
    yield text[start:]


def _read_range(unit: Unit) -> tuple[bytes, int]:
    pattern, lookback = (_TXT_BOUNDARY, 3) if unit.kind == ".txt" else (_LINE_BOUNDARY, 1)
    size = Path(unit.source).stat().st_size
    with open(unit.source, "rb") as f:
        begin = _boundary_at_or_after(f, unit.start, pattern, lookback, size)
        end = _boundary_at_or_after(f, unit.stop, pattern, lookback, size)
        f.seek(begin)
        return (f.read(end - begin) if end > begin else b""), begin


def _decompressed_chunks(unit: Unit) -> Iterator[bytes]:
    """The decompressed bytes of a .jsonl.gz / .jsonl.zst file, in chunks; a truncated stream is an error."""
    if unit.kind == ".jsonl.gz":
        with gzip.open(unit.source, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk
        return
    import zstandard

    with open(unit.source, "rb") as f:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        while data := f.read(1 << 20):
            while data:
                yield dobj.decompress(data)
                data = dobj.unused_data if dobj.eof else b""  # the next frame of a multi-frame file
                if dobj.eof and data:
                    dobj = zstandard.ZstdDecompressor().decompressobj()
        if not dobj.eof:
            raise EOFError("the stream ends inside a frame: the file is truncated")


def _compressed_lines(unit: Unit) -> Iterator[tuple[int, str]]:
    kind = "gzip" if unit.kind == ".jsonl.gz" else "zstd"
    lineno, rest = 0, b""

    def decoded(raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorpusError(f"{unit.source}:{lineno}: not UTF-8 text (convert the file to UTF-8)") from None

    try:
        for chunk in _decompressed_chunks(unit):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            for raw in lines:
                lineno += 1
                yield lineno, decoded(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise CorpusError(f"{unit.source!r}: not a valid {kind} stream ({e}); re-download or recompress it") from None
    except Exception as e:  # zstandard.ZstdError is not an OSError
        if type(e).__name__ != "ZstdError":
            raise
        raise CorpusError(f"{unit.source!r}: not a valid {kind} stream ({e}); re-download or recompress it") from None
    if rest:
        lineno += 1
        yield lineno, decoded(rest)


def unit_documents(unit: Unit, text_field: str = "text", txt_doc_chars: int = 4096) -> Iterator[str]:
    """The documents of one unit, in order (empty ones included; the caller skips them)."""
    if unit.kind == BUILTIN:
        from pd_lightning.corpus.builtin import builtin_documents

        yield from builtin_documents(unit.start, unit.stop)
    elif unit.kind == ".txt":
        data, begin = _read_range(unit)
        yield from txt_documents(_decode(data, unit.source, begin), txt_doc_chars)
    elif unit.kind == ".jsonl":
        data, begin = _read_range(unit)
        offset = begin
        for raw in data.split(b"\n"):  # the cut is after a b"\n" too: lines are exactly the file's
            line = _decode(raw, unit.source, offset)
            try:
                text = _record_text(line, text_field, unit.source)
            except CorpusError as e:
                where = f"{unit.source}:{_line_number(unit.source, offset)}"
                raise CorpusError(str(e).replace(unit.source, where, 1)) from None
            offset += len(raw) + 1
            if text is not None:
                yield text
    elif unit.kind in (".jsonl.gz", ".jsonl.zst"):
        for lineno, line in _compressed_lines(unit):
            text = _record_text(line, text_field, f"{unit.source}:{lineno}")
            if text is not None:
                yield text
    else:
        pf = _parquet_file(Path(unit.source), text_field)
        for batch in pf.iter_batches(columns=[text_field], row_groups=list(range(unit.start, unit.stop))):
            yield from (str(t) for t in batch.column(0).to_pylist() if t is not None)


PIECE_CHARS = 1 << 18  # a longer document is tokenized in pieces of about this many characters
_PIECE_CUT = re.compile(r" (?=\S)")  # just before a space that starts a word


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` cut into pieces of ``size`` to ``2 * size`` characters, for tokenizing: each cut falls just before a
    space followed by a non-space character, where a byte-level BPE's pre-tokenizer (GPT-2's regex: the BPE that
    ``prepare`` trains, GPT-2/Llama-3-style tokenizers) splits anyway, so the pieces' ids joined equal the whole
    text's. A stretch of ``2 * size`` characters without a space is cut at ``size``. Tokenizing a document of tens
    of MB in one call takes many GB of memory (the tokenizer's per-token bookkeeping); in pieces, a few MB."""
    start, n = 0, len(text)
    while n - start > 2 * size:
        m = _PIECE_CUT.search(text, start + size, start + 2 * size)
        cut = m.start() if m else start + size
        yield text[start:cut]
        start = cut
    if start == 0:
        yield text
    elif start < n:
        yield text[start:]


def iter_documents(
    inputs: list[str], text_field: str = "text", txt_doc_chars: int = 4096, chunk_bytes: int = 16 << 20
) -> Iterator[str]:
    """Every non-empty document of every input, in the order ``prepare`` tokenizes them."""
    for unit in plan_units(inputs, chunk_bytes, text_field):
        for text in unit_documents(unit, text_field, txt_doc_chars):
            if text.strip():
                yield text
