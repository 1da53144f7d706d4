"""Streaming, parallel, resumable `pd-lightning prepare`: the same rows for any worker count and any input format,
byte ranges that lose and repeat nothing, a real SIGKILL resumed to the uninterrupted result, and bad input."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pd_lightning.cache.format import token_source_fingerprint
from pd_lightning.cli import main
from pd_lightning.corpus.inputs import Unit, plan_units, unit_documents
from pd_lightning.corpus.prepare import TokenFile, prepare

ROOT = Path(__file__).resolve().parents[1]
PD = str(Path(sys.executable).with_name("pd-lightning"))


def _docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _all_rows(path: Path) -> dict[str, np.ndarray]:
    tf = TokenFile(path)
    return {s: tf.rows(s, slice(None)) for s in ("train", "val")}


@pytest.fixture(scope="module")
def formats(tmp_path_factory) -> Path:
    """The same documents as .jsonl, .jsonl.gz, .jsonl.zst (two frames) and .parquet (several row groups)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path_factory.mktemp("formats")
    docs = _docs()[:40]
    lines = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode()
    (d / "x.jsonl").write_bytes(lines)
    (d / "x.jsonl.gz").write_bytes(gzip.compress(lines))
    cut = lines.index(b"\n", len(lines) // 2) + 1
    zc = zstandard.ZstdCompressor()
    (d / "x.jsonl.zst").write_bytes(zc.compress(lines[:cut]) + zc.compress(lines[cut:]))
    pq.write_table(pa.table({"text": docs}), d / "x.parquet", row_group_size=25)
    (d / "book.txt").write_text("\n\n".join(_docs()[40:]), encoding="utf-8")
    return d


def test_every_format_gives_the_same_rows(tmp_path, formats, prepared):
    tok = str(prepared["tokenizer"])
    ref = None
    for name in ("x.jsonl", "x.jsonl.gz", "x.jsonl.zst", "x.parquet"):
        prepare(input=[str(formats / name)], output=str(tmp_path / f"{name}.h5"), seq_len=32, tokenizer=tok, workers=0)
        rows = _all_rows(tmp_path / f"{name}.h5")
        if ref is None:
            ref = rows
            assert len(rows["train"]) > 100 and len(rows["val"]) > 0
        for s in ("train", "val"):
            np.testing.assert_array_equal(rows[s], ref[s], err_msg=name)


def test_byte_ranges_lose_and_repeat_nothing(formats):
    # .jsonl cut into ~2 KiB ranges: exactly the file's lines, in order.
    jsonl = formats / "x.jsonl"
    units = plan_units([str(jsonl)], 2048)
    assert len(units) > 50
    texts = [t for u in units for t in unit_documents(u)]
    assert texts == [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    # .txt cut into ~4 KiB ranges (each starts after a blank line): the documents hold every word of the text once,
    # in order (only the blank lines at the cuts are dropped).
    book = formats / "book.txt"
    units = plan_units([str(book)], 4096)
    docs = [d for u in units for d in unit_documents(u, txt_doc_chars=1000)]
    assert len(units) > 20 and " ".join(docs).split() == book.read_text(encoding="utf-8").split()
    whole = list(unit_documents(Unit(str(book), ".txt", 0, book.stat().st_size, 0), txt_doc_chars=1000))
    assert len(docs) >= len(whole) > 20


def test_same_rows_for_any_worker_count(tmp_path, formats, prepared):
    inputs = [str(formats / n) for n in ("book.txt", "x.jsonl", "x.jsonl.gz", "x.parquet")]
    common = dict(seq_len=32, tokenizer=str(prepared["tokenizer"]), chunk_mb=0.01, shard_tokens=33 * 200)
    outs = {}
    for workers in (1, 2, 0):
        outs[workers] = tmp_path / f"w{workers}" / "tokens.h5"
        prepare(input=inputs, output=str(outs[workers]), workers=workers, **common)
    ref = _all_rows(outs[1])
    assert len(TokenFile(outs[1]).sharded.files["train"]) > 5
    for workers in (2, 0):
        rows = _all_rows(outs[workers])
        for s in ("train", "val"):
            np.testing.assert_array_equal(rows[s], ref[s], err_msg=f"workers={workers} {s}")
        assert TokenFile(outs[workers]).attrs == TokenFile(outs[1]).attrs
        assert token_source_fingerprint(outs[workers], "train") == token_source_fingerprint(outs[1], "train")


def _prepare_cmd(inputs: list[Path], out: Path, workers: int) -> list[str]:
    return [PD, "prepare", "--input", *map(str, inputs), "--output", str(out), "--seq_len", "64", "--vocab_size",
            "512", "--chunk_mb", "0.02", "--shard_tokens", "6500", "--workers", str(workers)]  # fmt: skip


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path):
    """A real SIGKILL of prepare (and its workers) mid-run; the rerun keeps the finished parts and shards (it says
    how many) and ends with exactly the rows and tokenizer of an uninterrupted run."""
    from pd_lightning.corpus.builtin import builtin_documents

    corpus = tmp_path / "docs.jsonl"
    with corpus.open("w") as f:
        for text in builtin_documents():
            f.write(json.dumps({"text": text}) + "\n")
            if f.tell() > 700_000:  # ~60 parts of 20 KiB: enough to be killed in the middle
                break
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    killed = tmp_path / "killed" / "tokens.h5"
    proc = subprocess.Popen(_prepare_cmd([corpus], killed, 2), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    shards = killed.parent / "tokens.shards"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        states = list(shards.glob(".work-*/state.json"))
        if states and len(json.loads(states[0].read_text())["train"]["shards"]) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "prepare finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not killed.exists()
    resumed = subprocess.run(_prepare_cmd([corpus], killed, 2), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    line = next(x for x in resumed.stdout.splitlines() if x.startswith("resuming:"))
    done, total = map(int, line.split()[1:4:2])
    assert 0 < done < total, line
    reference = tmp_path / "full" / "tokens.h5"
    main(_prepare_cmd([corpus], reference, 0)[1:])  # uninterrupted, in this process
    a, b = _all_rows(killed), _all_rows(reference)
    for s in ("train", "val"):
        np.testing.assert_array_equal(a[s], b[s])
    assert TokenFile(killed).attrs == TokenFile(reference).attrs  # the same trained tokenizer, counts, shards
    assert not list(shards.glob(".*")), "work folders are removed at the end"


def _fails(capsys, argv: list[str], *needles: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    assert "training a byte-level BPE" not in captured.out  # refused before any work
    return err


def test_bad_corpus_files_name_the_file_and_line(tmp_path, capsys, formats, prepared):
    import zstandard

    out = tmp_path / "o.h5"
    base = ["prepare", "--output", str(out), "--tokenizer", str(prepared["tokenizer"]), "--workers", "0"]
    good = (formats / "x.jsonl").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(good)[:5000])
    _fails(capsys, [*base, "--input", str(tmp_path / "cut.jsonl.gz")], "cut.jsonl.gz", "not a valid gzip stream")
    (tmp_path / "cut.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(good)[:5000])
    _fails(capsys, [*base, "--input", str(tmp_path / "cut.jsonl.zst")], "cut.jsonl.zst", "truncated")
    (tmp_path / "plain.jsonl.gz").write_bytes(good)
    _fails(capsys, [*base, "--input", str(tmp_path / "plain.jsonl.gz")], "plain.jsonl.gz", "not a gz file")
    no_text = good + json.dumps({"body": "x"}).encode() + b"\n"
    (tmp_path / "field.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(no_text))
    n = no_text.count(b"\n")
    _fails(capsys, [*base, "--input", str(tmp_path / "field.jsonl.zst")], f"field.jsonl.zst:{n}", "'text'")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    _fails(capsys, [*base, "--input", str(tmp_path / "latin1.txt")], "latin1.txt", "not UTF-8", "byte 3")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    _fails(capsys, [*base, "--input", str(tmp_path / "latin1.jsonl")], "latin1.jsonl", "not UTF-8")
    assert not out.exists() and not (tmp_path / "o.shards").exists()


def test_unusable_output_is_refused_before_tokenizing(tmp_path, capsys, corpus_dir):
    base = ["prepare", "--input", str(corpus_dir / "a.txt"), "--vocab_size", "300"]
    (tmp_path / "file").write_text("x")
    _fails(capsys, [*base, "--output", str(tmp_path / "file" / "tokens.h5")], "is a file, not a folder")
    _fails(capsys, [*base, "--output", str(tmp_path)], "is a folder")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokens.shards").write_text("in the way")
    _fails(capsys, [*base, "--output", str(tmp_path / "b" / "tokens.h5")], "tokens.shards", "is a file")
    if os.access("/sys", os.W_OK) and not Path("/sys/kernel").is_dir():
        pytest.skip("no read-only location to write to")
    _fails(capsys, [*base, "--output", "/sys/pd-lightning/tokens.h5"], "/sys/pd-lightning/tokens.h5", "cannot write")
    assert not (tmp_path / "tokenizer").exists() and not (tmp_path / "b" / "tokenizer").exists()


def test_failed_prepare_leaves_nothing_that_blocks_the_rerun(tmp_path, capsys, corpus_dir):
    """Issue 8 item 8: a bad line after the BPE was trained used to leave tokenizer/, refused by the rerun."""
    bad = tmp_path / "corpus.jsonl"
    good_lines = (corpus_dir / "c.jsonl").read_text()
    bad.write_text(good_lines + '{"body": "no text"}\n')
    out = tmp_path / "data" / "tokens.h5"
    argv = ["prepare", "--input", str(bad), "--output", str(out), "--vocab_size", "300", "--seq_len", "32"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "corpus.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # not even the folder it created
    bad.write_text(good_lines)
    main(argv)
    assert TokenFile(out).lengths["train"] > 0 and (tmp_path / "data" / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("stop_after", [2, 9, 31])
def test_interrupted_at_any_part_resumes_to_the_same_rows(tmp_path, formats, prepared, monkeypatch, stop_after):
    """Interrupted (KeyboardInterrupt) after ``stop_after`` part files were packed, with tiny shards so that train and
    val stand at different parts: the rerun redoes only the unfinished parts and gives the uninterrupted rows."""
    import pd_lightning.corpus.prepare as corpus

    kw = dict(input=[str(formats / "x.jsonl"), str(formats / "book.txt")], seq_len=16, workers=0, chunk_mb=0.005,
              tokenizer=str(prepared["tokenizer"]), shard_tokens=17 * 40, val_fraction=0.2)  # fmt: skip
    prepare(output=str(tmp_path / "ref" / "tokens.h5"), **kw)
    real, calls, tokenized = corpus._feed_part, [], []

    def feed(*args):
        calls.append(1)
        if len(calls) > stop_after:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(corpus, "_feed_part", feed)
    out = tmp_path / "cut" / "tokens.h5"
    with pytest.raises(KeyboardInterrupt):
        prepare(output=str(out), **kw)
    assert not out.exists()
    finished = {int(p.stem) for p in out.parent.glob("tokens.shards/.work-*/parts/*.json")}
    monkeypatch.setattr(corpus, "_feed_part", real)
    real_tokenize = corpus.tokenize_unit
    monkeypatch.setattr(corpus, "tokenize_unit", lambda job: tokenized.append(job[0]) or real_tokenize(job))
    prepare(output=str(out), **kw)
    n_units = len(plan_units(kw["input"], int(0.005 * 2**20)))
    assert finished and tokenized and not finished & set(tokenized)  # no finished part was tokenized again
    assert len(finished) + len(tokenized) >= n_units
    a, b = _all_rows(out), _all_rows(tmp_path / "ref" / "tokens.h5")
    for s in ("train", "val"):
        np.testing.assert_array_equal(a[s], b[s])
    assert not list((out.parent / "tokens.shards").glob(".*"))


def test_killed_between_moving_the_tokenizer_and_writing_the_index(tmp_path, corpus_dir, monkeypatch):
    """The last steps: the trained tokenizer is moved to tokenizer/, then the index is written. Interrupted in
    between, the same command (no --overwrite) must still finish, with the same tokenizer and rows."""
    import pd_lightning.corpus.prepare as corpus

    kw = dict(input=[str(corpus_dir / "c.jsonl")], seq_len=32, vocab_size=300, workers=0)
    prepare(output=str(tmp_path / "ref" / "tokens.h5"), **kw)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus, "write_index", interrupted)
    out = tmp_path / "cut" / "tokens.h5"
    with pytest.raises(KeyboardInterrupt):
        prepare(output=str(out), **kw)
    assert (out.parent / "tokenizer" / "tokenizer.json").is_file() and not out.exists()
    monkeypatch.undo()
    prepare(output=str(out), **kw)
    assert TokenFile(out).attrs == TokenFile(tmp_path / "ref" / "tokens.h5").attrs  # fingerprint included
    np.testing.assert_array_equal(_all_rows(out)["train"], _all_rows(tmp_path / "ref" / "tokens.h5")["train"])
    assert not (out.parent / "tokenizer" / "key.json").exists()


def test_the_embedded_corpus_in_units_is_the_same_documents():
    from pd_lightning.corpus.builtin import builtin_documents

    units = plan_units(["builtin"], 1 << 20)
    assert len(units) > 1
    assert [d for u in units for d in unit_documents(u)] == list(builtin_documents())
