"""A JSON text field that is not a string (a list, an object, a number) is refused by file and line, not tokenized
as its Python repr."""

from __future__ import annotations

import json

import pytest

from pd_lightning.cli import main


def refused(corpus, tmp_path, capsys) -> str:
    """``prepare`` of ``corpus`` exits 2 with nothing written; returns its error output."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--input", str(corpus), "--vocab_size", "300", "--seq_len", "16", "--workers", "0",
              "--output", str(out / "tokens.h5")])  # fmt: skip
    assert e.value.code == 2
    assert not (out / "tokens.h5").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("value", [["a list", "of parts"], {"an": "object"}, 5])
def test_non_string_text_field_is_refused(tmp_path, capsys, value) -> None:
    corpus = tmp_path / "c.jsonl"
    lines = [json.dumps({"text": f"document {i} about rivers, mills and grain prices."}) for i in range(300)]
    lines.insert(120, json.dumps({"text": value}))
    corpus.write_text("\n".join(lines) + "\n")
    err = refused(corpus, tmp_path, capsys)
    assert "c.jsonl:121" in err and "'text'" in err and "string" in err, err


def test_non_string_parquet_column_is_refused(tmp_path, capsys) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [[f"part {i}", "of a document"] for i in range(300)]}), corpus)
    err = refused(corpus, tmp_path, capsys)
    assert "c.parquet" in err and "'text'" in err and "not strings" in err, err
