"""`pd-lightning prepare`: packing against the tokenizer run by hand, metadata, the .txt document split, the token
file reader (sharded and legacy), and every bad-input refusal."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from pd_lightning.cli import main
from pd_lightning.corpus.inputs import iter_documents, txt_documents
from pd_lightning.corpus.prepare import TokenFile, prepare
from pd_lightning.corpus.tokenizer import load_tokenizer, tokenizer_fingerprint
from pd_lightning.corpus.workers import is_val


def _stream_rows(ids: list[int], L: int) -> np.ndarray:
    """Reference packing: row i = ids[i*L : i*L + L + 1], written out with a Python loop."""
    n = (len(ids) - 1) // L
    return np.asarray([ids[i * L : i * L + L + 1] for i in range(n)], dtype=np.int32).reshape(n, L + 1)


def test_packing_reconstructs_the_eos_joined_stream(prepared, corpus_dir):
    tok = load_tokenizer(prepared["tokenizer"])
    docs = list(iter_documents([str(corpus_dir / n) for n in ("a.txt", "b.jsonl", "c.jsonl")]))
    with h5py.File(prepared["tokens"]) as f:  # any HDF5 reader sees /train and /val (virtual datasets over shards)
        train, val = f["train"][:], f["val"][:]
        attrs = dict(f.attrs)
    L = int(attrs["seq_len"])
    assert train.shape[1] == val.shape[1] == L + 1 == 65
    assert attrs["complete"] and attrs["vocab_size"] == len(tok) and attrs["eos_id"] == tok.eos_token_id
    assert attrs["tokenizer_fingerprint"] == tokenizer_fingerprint(tok) and attrs["layout"] == "shards"
    # Every document, tokenized independently here (transformers' tokenizer call), followed by EOS.
    expected = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs]
    assert attrs["num_tokens"] == sum(map(len, expected)) and attrs["num_documents"] == len(docs)
    # Each split's rows are exactly the packing of its documents' stream, in order; the hash of the text decides.
    for split, rows in (("train", train), ("val", val)):
        stream = [t for d, e in zip(docs, expected) if is_val(d, 0.05) == (split == "val") for t in e]
        np.testing.assert_array_equal(rows, _stream_rows(stream, L))
    assert len(val) > 0
    tf = TokenFile(prepared["tokens"])
    np.testing.assert_array_equal(tf.rows("train", slice(None)), train)
    assert tf.lengths == {"train": len(train), "val": len(val)} and tf.fingerprint == tokenizer_fingerprint(tok)


def test_txt_documents_cut_at_the_first_blank_line_after_the_minimum():
    text = "aaaa\n\nbb\n\ncccccc\n \n\nd\n\ne"
    # min 5: "aaaa" (4) is too short, so it gathers "bb"; the cut drops only the blank lines at it.
    assert list(txt_documents(text, 5)) == ["aaaa\n\nbb", "cccccc", "d\n\ne"]
    assert list(txt_documents(text, 1000)) == [text]  # a short file stays one document
    assert list(txt_documents("x\n\n", 1)) == ["x", ""]


def test_a_single_txt_file_gets_a_validation_part(tmp_path, prepared):
    """Issue 7 item 9: one .txt file used to be one document, so the hash put all of it on one side."""
    from pydoc_data.topics import topics

    corpus = tmp_path / "book.txt"
    corpus.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    s = prepare(input=[str(corpus)], output=str(tmp_path / "t.h5"), seq_len=64, tokenizer=str(prepared["tokenizer"]))
    docs = list(txt_documents(corpus.read_text(encoding="utf-8"), 4096))
    assert s["num_documents"] == len(docs) > 100
    assert all(len(d) >= 4096 for d in docs[:-1])
    assert s["val_sequences"] > 0 and s["train_sequences"] > 10 * s["val_sequences"]


def test_no_validation_part_is_warned(tmp_path, prepared, capsys):
    (tmp_path / "one.txt").write_text("a short corpus of one document " * 40)
    main(["prepare", "--input", str(tmp_path / "one.txt"), "--output", str(tmp_path / "t.h5"), "--seq_len", "8",
          "--tokenizer", str(prepared["tokenizer"]), "--val_fraction", "0.05"])  # fmt: skip
    err = capsys.readouterr().err
    assert "warning" in err and "no validation sequences" in err and str(tmp_path / "t.h5") in err


def test_parquet_and_existing_tokenizer(tmp_path, prepared):
    from pydoc_data.topics import topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [topics[k] for k in sorted(topics)[:40]]
    pq.write_table(pa.table({"content": texts}), tmp_path / "x.parquet", row_group_size=7)  # 6 row groups
    with (tmp_path / "x.jsonl").open("w") as f:
        f.writelines(json.dumps({"content": t}) + "\n" for t in texts)
    outs = {}
    for name in ("x.parquet", "x.jsonl"):
        out = tmp_path / f"{name}.h5"
        s = prepare(
            input=[str(tmp_path / name)], output=str(out), seq_len=32, tokenizer=str(prepared["tokenizer"]),
            text_field="content", val_fraction=0.0, workers=2,
        )  # fmt: skip
        assert s["val_sequences"] == 0 and s["train_sequences"] > 0
        outs[name] = TokenFile(out)
    assert outs["x.parquet"].fingerprint == TokenFile(prepared["tokens"]).fingerprint
    a, b = (outs[n].rows("train", slice(None)) for n in ("x.parquet", "x.jsonl"))
    np.testing.assert_array_equal(a, b)


def test_token_file_rows_and_refusals(tmp_path, prepared, corpus_dir):
    out = tmp_path / "t.h5"
    prepare(input=[str(corpus_dir / "c.jsonl")], output=str(out), seq_len=16, tokenizer=str(prepared["tokenizer"]),
            shard_tokens=17 * 1000, workers=0)  # fmt: skip
    tf = TokenFile(out)
    with h5py.File(out) as f:
        ref = f["train"][:]
    assert len(tf.sharded.files["train"]) == -(-len(ref) // 1000) > 3
    np.testing.assert_array_equal(tf.rows("train", 123), ref[123])
    np.testing.assert_array_equal(tf.rows("train", -1), ref[-1])
    np.testing.assert_array_equal(tf.rows("train", slice(40, 160, 3)), ref[40:160:3])
    picks = np.array([7000, 3, 999, 1000, 3, 2500])  # unsorted, repeated, across shard edges
    np.testing.assert_array_equal(tf.rows("train", picks), ref[picks])
    tf.verify()
    tf.close()
    # A shard that does not belong to the index (another run's), and a missing one: refused, named.
    shards = sorted(out.parent.joinpath("t.shards").glob("train-*.h5"))
    with h5py.File(shards[1], "r+") as f:
        f["rows"][0, 0] += 1
    with pytest.raises(ValueError, match="fails its checksum"):
        TokenFile(out).verify()
    shards[2].unlink()
    with pytest.raises(FileNotFoundError, match=shards[2].name):
        TokenFile(out, flag="--data.path")
    with h5py.File(shards[1], "r+") as f:
        f.attrs["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="does not belong"):
        TokenFile(out)


def test_legacy_single_file_is_still_read(tmp_path):
    rows = np.arange(30 * 9, dtype=np.int32).reshape(30, 9)
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f["train"], f["val"] = rows, rows[:4]
        f.attrs.update(schema_version=1, tokenizer_fingerprint="t", vocab_size=300, seq_len=8, complete=True)
    tf = TokenFile(tmp_path / "old.h5")
    assert tf.lengths == {"train": 30, "val": 4} and tf.sharded is None
    np.testing.assert_array_equal(tf.rows("train", slice(2, 5)), rows[2:5])


def _fails(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return captured


def test_bad_inputs(tmp_path, capsys, prepared, corpus_dir):
    out = tmp_path / "o.h5"
    base = ["prepare", "--output", str(out), "--tokenizer", str(prepared["tokenizer"])]
    _fails(capsys, [*base, "--input", str(tmp_path / "missing.txt")], "missing.txt", "does not exist")
    (tmp_path / "empty.txt").write_text("")
    _fails(capsys, [*base, "--input", str(tmp_path / "empty.txt")], "empty.txt", "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"body": "no text"}) + "\n")
    _fails(capsys, [*base, "--input", str(bad)], "bad.jsonl:3", "'text'", "--text_field")
    _fails(capsys, [*base, "--input", str(corpus_dir / "a.txt"), "--seq_len", "0"], "--seq_len", "0")
    _fails(capsys, [*base, "--input", str(corpus_dir / "a.txt"), "--workers", "-1"], "--workers")
    _fails(
        capsys,
        ["prepare", "--output", str(out), "--input", str(corpus_dir / "a.txt"), "--tokenizer", str(tmp_path / "nope")],
        "--tokenizer",
        "nope",
    )
    assert not out.exists() and not (tmp_path / "o.shards").exists()  # nothing half-written
    # An existing output is refused unless --overwrite, and left untouched.
    out.write_bytes(b"keep me")
    _fails(capsys, [*base, "--input", str(corpus_dir / "a.txt")], str(out), "--overwrite")
    assert out.read_bytes() == b"keep me"
    main([*base, "--input", str(corpus_dir / "a.txt"), "--overwrite", "true", "--seq_len", "32"])
    assert TokenFile(out).attrs["complete"]
