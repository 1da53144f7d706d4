"""`pd-lightning export-hf` in the README's form and positionally, checked against transformers' Llama; the output
checks for a user who is not root (root ignores permission bits)."""

from __future__ import annotations

import os
from pathlib import Path

# Imported at collection, so Lightning's log handler binds to the session's stderr: imported first inside a test
# that uses capsys, it would keep that test's stream and print '--- Logging error ---' tracebacks later.
import lightning.pytorch  # noqa: F401
import pytest
import torch

from pd_lightning.cli import main


@pytest.fixture(scope="module")
def student_ckpt(tmp_path_factory, prepared) -> Path:
    root = tmp_path_factory.mktemp("cli_ckpt")
    main(
        [
            "fit", "--seed_everything", "3", "--model.student.preset", "tiny",
            "--data.path", str(prepared["tokens"]), "--data.batch_size", "4", "--data.val_sequences", "8",
            "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(root),
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            "--trainer.callbacks.dirpath", str(root), "--trainer.callbacks.filename", "student",
        ]
    )  # fmt: skip
    return root / "student.ckpt"


def test_export_hf_flag_and_positional_forms(tmp_path, student_ckpt, prepared, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pd_lightning.eval.lm import load_student_checkpoint

    a, b = tmp_path / "flags", tmp_path / "positional"
    main(["export-hf", "--ckpt", str(student_ckpt), "--output", str(a), "--tokenizer", str(prepared["tokenizer"])])
    main(["export-hf", str(student_ckpt), str(b), str(prepared["tokenizer"])])
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert not list(tmp_path.glob(".*.partial"))  # written under a temporary name, renamed at the end
    # The export computes what the student computes (reference: transformers' own Llama on the exported folder).
    student, _ = load_student_checkpoint(student_ckpt)
    hf = AutoModelForCausalLM.from_pretrained(str(a)).eval()
    tok = AutoTokenizer.from_pretrained(str(a))
    ids = torch.tensor([tok("def f(x):\n    return x + 1").input_ids])
    with torch.no_grad():
        diff = (hf(input_ids=ids).logits - student(ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_export_hf_saves_the_recorded_tokenizer_by_default(tmp_path, student_ckpt, prepared, capsys):
    """Without --tokenizer the export saves the tokenizer the checkpoint records (the one it was trained with)."""
    from transformers import AutoTokenizer

    out = tmp_path / "hf"
    main(["export-hf", "--ckpt", str(student_ckpt), "--output", str(out)])
    assert "saving the tokenizer the checkpoint records" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file()
    text = "def f(x):\n    return x + 1"
    expected = AutoTokenizer.from_pretrained(str(prepared["tokenizer"]))(text).input_ids
    assert AutoTokenizer.from_pretrained(str(out))(text).input_ids == expected


def test_export_hf_refuses_another_tokenizer(tmp_path, student_ckpt, corpus_dir, capsys):
    """The tokenizer saved beside the weights must be the one the student was trained with (fingerprints)."""
    from pd_lightning.corpus.prepare import prepare

    other = tmp_path / "other" / "tokens.h5"
    prepare(input=[str(corpus_dir / "a.txt")], output=str(other), seq_len=16, vocab_size=300, workers=0)
    with pytest.raises(SystemExit) as e:
        main(["export-hf", "--ckpt", str(student_ckpt), "--output", str(tmp_path / "hf"), "--tokenizer",
              str(other.parent / "tokenizer")])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and "not the tokenizer the student was trained with" in err, err
    assert not (tmp_path / "hf").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits; the suite covers this case "
                    "through a path under a regular file instead")  # fmt: skip
def test_output_in_a_read_only_folder_is_refused_before_the_work(tmp_path, student_ckpt, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SystemExit) as e:
            main(["export-hf", "--ckpt", str(student_ckpt), "--output", str(locked / "hf")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--output" in err and "permission denied" in err, err
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o755)


def test_probe_refuses_where_no_file_can_be_created(tmp_path, monkeypatch):
    """The write probe (not os.access, which answers True for root) is what refuses: a folder where creating a file
    fails with EROFS (a read-only mount, simulated: mounting needs privileges the suite has not) is refused."""
    import errno
    import tempfile

    from pd_lightning import paths

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(ValueError, match=r"--writer.output .*cannot write in .*read-only"):
        paths.check_output_dir(tmp_path / "cache", "--writer.output")
    assert not (tmp_path / "cache").exists()


def test_sharded_checkpoint_folder(tmp_path, student_ckpt, prepared, capsys):
    """An FSDP sharded checkpoint folder (weights beside a ``meta.pt`` of everything else, as Lightning writes it with
    ``state_dict_type: sharded``) passes the check under FSDP only; elsewhere, and as a teacher, one line says what to
    do; a damaged ``meta.pt`` is named."""
    from pd_lightning.checkpoint_io import check_ckpt_path

    full = torch.load(student_ckpt, weights_only=True)
    folder = tmp_path / "step=2.ckpt"
    folder.mkdir()
    torch.save({k: v for k, v in full.items() if k not in ("state_dict", "optimizer_states")}, folder / "meta.pt")
    check_ckpt_path(str(folder), "fit", fsdp=True)  # the metadata of a pd-lightning run: accepted
    args = ["fit", "--model.student.preset", "tiny", "--data.path", str(prepared["tokens"]), "--trainer.max_steps",
            "3", "--trainer.default_root_dir", str(tmp_path / "run"), "--ckpt_path", str(folder)]  # fmt: skip
    for argv, words in [
        (args, ("--ckpt_path", "sharded", "consolidate_checkpoint")),
        (["predict", "--model.teacher", str(folder), "--model.processor", "TopPK", "--data.path",
          str(prepared["tokens"]), "--writer.output", str(tmp_path / "cache")], ("--model.teacher", "consolidate")),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = [s for s in capsys.readouterr().err.splitlines() if s.startswith("pd-lightning: error:")]
        assert len(err) == 1 and all(w in err[0] for w in words), err
    (folder / "meta.pt").write_bytes((folder / "meta.pt").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"--ckpt_path .*meta.pt.*truncated"):
        check_ckpt_path(str(folder), "fit", fsdp=True)
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
