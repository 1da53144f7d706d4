"""Issue item 14: the one-line errors blame the input that is wrong.

- a blank ``.txt`` / ``.jsonl`` corpus (whitespace, blank lines, empty texts) blamed ``--seq_len`` ("the training
  part has only 0 tokens"): it names the input and says it holds no text, with or without a trained BPE;
- a Hugging Face folder whose ``config.json`` has an ``auto_map`` (its modelling code ships in the folder) said
  "not a Hugging Face model folder" with a made-up ``https://hf.co//<local path>`` link: it names
  ``--model.trust_remote_code``.
(Validation tokens of another tokenizer naming the cache instead of ``--data.val_tokens``: that check is in
``cache_datamodule.py``, another helper's file; see the xfail case in ``tests/test_bad_inputs.py``.)
"""

from __future__ import annotations

import json

import pytest

from pd_lightning.cli import main


def _fail(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = [s for s in capsys.readouterr().err.splitlines() if s.strip()]
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("pd-lightning: error: ")
    return err[0]


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("blank.txt", "   \n\n \t \n\n\n"),
        ("blank.jsonl", "\n\n   \n"),
        ("empty-texts.jsonl", '{"text": ""}\n{"text": "   \\n "}\n'),
    ],
)
@pytest.mark.parametrize("trained", [False, True])
def test_a_blank_corpus_names_the_input(tmp_path, prepared, capsys, name, content, trained):
    corpus = tmp_path / name
    corpus.write_text(content)
    out = tmp_path / "out" / "t.h5"
    tok = ["--vocab_size", "300"] if trained else ["--tokenizer", str(prepared["tokenizer"])]
    line = _fail(["prepare", "--input", str(corpus), "--output", str(out), "--workers", "0", *tok], capsys)
    assert "--input" in line and str(corpus) in line and "no text" in line, line
    assert "--seq_len" not in line, line
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_a_blank_file_among_others_is_fine(tmp_path, prepared, capsys):
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "words of text " * 200}) + "\n")
    tok = str(prepared["tokenizer"])
    main(["prepare", "--input", str(tmp_path / "blank.txt"), str(tmp_path / "text.jsonl"), "--workers", "0",
          "--output", str(tmp_path / "t.h5"), "--seq_len", "16", "--tokenizer", tok])  # fmt: skip
    assert (tmp_path / "t.h5").is_file()


def test_an_hf_folder_with_its_own_code_names_trust_remote_code(tmp_path):
    from pd_lightning.teacher import load_teacher

    folder = tmp_path / "custom-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "my_custom", "architectures": ["MyCustomForCausalLM"], "vocab_size": 100,
        "auto_map": {"AutoConfig": "configuration_my.MyConfig",
                     "AutoModelForCausalLM": "modeling_my.MyCustomForCausalLM"},
    }))  # fmt: skip
    with pytest.raises(ValueError) as e:
        load_teacher(folder)
    line = str(e.value)
    assert "\n" not in line and "--model.trust_remote_code true" in line and str(folder) in line, line
    assert "modeling_my.MyCustomForCausalLM" in line
    assert "hf.co" not in line and "not a Hugging Face model folder" not in line, line
