"""`pd-lightning prepare`: packing against the tokenizer run by hand, metadata, and every bad-input refusal."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from pd_lightning.cli import main
from pd_lightning.data.corpus import _is_val, iter_documents, prepare
from pd_lightning.data.tokenizer import load_tokenizer, tokenizer_fingerprint


def test_packing_reconstructs_the_eos_joined_stream(prepared, corpus_dir):
    tok = load_tokenizer(prepared["tokenizer"])
    docs = [d for d in iter_documents([str(corpus_dir / n) for n in ("a.txt", "b.jsonl", "c.jsonl")]) if d.strip()]
    with h5py.File(prepared["tokens"]) as f:
        train, val = f["train"][:], f["val"][:]
        attrs = dict(f.attrs)
    L = int(attrs["seq_len"])
    assert train.shape[1] == val.shape[1] == L + 1 == 65
    assert attrs["complete"] and attrs["vocab_size"] == len(tok) and attrs["eos_id"] == tok.eos_token_id
    assert attrs["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    # Every document, tokenized independently here, followed by EOS: the concatenation of both splits' streams.
    expected = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs]
    assert attrs["num_tokens"] == sum(map(len, expected)) and attrs["num_documents"] == len(docs)
    # Rows overlap by one token: row[i][-1] == row[i+1][0], and the un-overlapped rows form the stream's prefix.
    assert (train[:-1, -1] == train[1:, 0]).all()
    stream = np.concatenate([train[0], *[r[1:] for r in train[1:]]])
    # The train stream is exactly the train documents (those the document hash did not hold out), in order.
    train_docs = [e for i, e in enumerate(expected) if not _is_val(i, 0.05)]
    val_docs = [e for i, e in enumerate(expected) if _is_val(i, 0.05)]
    flat = np.asarray([t for e in train_docs for t in e])
    assert len(train) == (len(flat) - 1) // L
    np.testing.assert_array_equal(stream, flat[: len(train) * L + 1])
    assert len(val) == (sum(map(len, val_docs)) - 1) // L > 0


def test_bpe_roundtrip_is_lossless(prepared):
    tok = load_tokenizer(prepared["tokenizer"])
    text = "def f(x):\n    return x ** 2  # ünïcödé, 日本語"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_parquet_and_existing_tokenizer(tmp_path, prepared):
    from pydoc_data.topics import topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [topics[k] for k in sorted(topics)[:40]]
    pq.write_table(pa.table({"content": texts}), tmp_path / "x.parquet")
    out = tmp_path / "t.h5"
    s = prepare(
        input=[str(tmp_path / "x.parquet")], output=str(out), seq_len=32, tokenizer=str(prepared["tokenizer"]),
        text_field="content", val_fraction=0.0,
    )  # fmt: skip
    with h5py.File(prepared["tokens"]) as a, h5py.File(out) as b:
        assert a.attrs["tokenizer_fingerprint"] == b.attrs["tokenizer_fingerprint"]
        assert b["val"].shape == (0, 33)
    assert s["train_sequences"] > 0


def _fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code != 0
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs(tmp_path, capsys, prepared, corpus_dir):
    out = tmp_path / "o.h5"
    base = ["prepare", "--output", str(out), "--tokenizer", str(prepared["tokenizer"])]
    _fails(capsys, [*base, "--input", str(tmp_path / "missing.txt")], "missing.txt", "does not exist")
    (tmp_path / "empty.txt").write_text("")
    _fails(capsys, [*base, "--input", str(tmp_path / "empty.txt")], "empty.txt", "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    _fails(capsys, [*base, "--input", str(bad)], "bad.jsonl:2", "'text'")
    _fails(capsys, [*base, "--input", str(corpus_dir / "a.txt"), "--seq_len", "0"], "--seq_len", "0")
    _fails(
        capsys,
        ["prepare", "--output", str(out), "--input", str(corpus_dir / "a.txt"), "--tokenizer", str(tmp_path / "nope")],
        "--tokenizer",
        "nope",
    )
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))  # nothing half-written
    # An existing output is refused unless --overwrite, and left untouched.
    out.write_bytes(b"keep me")
    _fails(capsys, [*base, "--input", str(corpus_dir / "a.txt")], str(out), "--overwrite")
    assert out.read_bytes() == b"keep me"
    main([*base, "--input", str(corpus_dir / "a.txt"), "--overwrite", "true", "--seq_len", "32"])
    with h5py.File(out) as f:
        assert f.attrs["complete"]
