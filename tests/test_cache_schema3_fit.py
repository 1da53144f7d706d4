"""Schema 3 end to end through the CLI as users run it (issue 19): `predict` writes it by default, `--writer.schema 2`
the old format, `cache-upgrade` converts 2 -> 3 into exactly what a fresh schema-3 `predict` writes, and a student
trained from either cache is the same student (the two schemas hold the same quantised values)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pd_lightning.cache import TeacherCache, cache_info
from pd_lightning.cache.format import content_checksum
from pd_lightning.cli import main
from tests.test_predict import fit_from_cache, predict_args
from tests.test_train import train_losses, val_losses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def caches(hf_teacher, prepared, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("schema3")
    out = {"v2": root / "v2", "v3": root / "v3", "up": root / "up"}
    main(predict_args(hf_teacher, prepared["tokens"], out["v2"], "--writer.schema", "2"))
    main(predict_args(hf_teacher, prepared["tokens"], out["v3"]))  # the default
    main(["cache-upgrade", str(out["v2"]), "--output", str(out["up"])])
    return out


def test_predict_writes_schema_3_by_default_with_the_values_of_schema_2(caches):
    v2, v3 = TeacherCache(caches["v2"]), TeacherCache(caches["v3"])
    assert (v2.layout.schema, v3.layout.schema) == (2, 3)
    assert len(v2) == len(v3) > 0 and len(v3.files) > 1
    for i in range(len(v2)):
        a, b = v2[i], v3[i]
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (i, key)
    info2, info3 = cache_info(caches["v2"]), cache_info(caches["v3"])
    assert (info2["schema_version"], info3["schema_version"]) == (2, 3)
    assert info2["entries"] == info3["entries"] and info2["tokens"] == info3["tokens"]
    assert info3["max_abs_logprob_error_bound"] == info2["max_abs_logprob_error_bound"] < 4.3e-4
    # a 512-entry vocabulary, k = 20: ids cost ~1 B instead of 2.25 in the packed uint32, values < 1 B
    assert info3["bytes_per_entry"] < 0.75 * info2["bytes_per_entry"], (info3["bytes_per_entry"], info2)


def test_cache_upgrade_from_schema_2_equals_a_fresh_schema_3_predict(caches):
    assert TeacherCache(caches["up"]).layout.schema == 3
    assert content_checksum(caches["up"]) == content_checksum(caches["v3"])
    assert content_checksum(caches["up"]) != content_checksum(caches["v2"])


def test_a_student_trained_from_schema_3_is_the_student_trained_from_schema_2(caches, prepared, tmp_path):
    runs = {}
    for name in ("v2", "v3"):
        root = tmp_path / name
        main(fit_from_cache(caches[name], prepared["tokens"], root, 6, "--trainer.val_check_interval", "3"))
        runs[name] = (train_losses(root), val_losses(root))
    assert sorted(runs["v3"][0]) == list(range(1, 7)) and len(runs["v3"][1]) == 2
    assert runs["v2"] == runs["v3"]  # identical inputs, identical steps: equal to the last bit


def test_a_schema_the_writer_does_not_know_is_one_line(hf_teacher, prepared, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "cache"
    run = subprocess.run(
        [sys.executable, "-m", "pd_lightning.cli", *predict_args(hf_teacher, prepared["tokens"], out,
                                                                 "--writer.schema", "4")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--writer.schema" in lines[0] and "[2, 3]" in lines[0], run.stderr
    assert not out.exists() or not any(out.iterdir())


def _error_line(capsys) -> str:
    """The one line the command printed about why it stopped (besides a progress bar), with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "pd-lightning:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0][lines[0].index("pd-lightning:") :]


def test_cache_upgrade_refuses_what_it_cannot_do_in_one_line_naming_its_own_flags(caches, tmp_path, capsys):
    cases = {
        "shard_tokens": (["--output", str(tmp_path / "a"), "--shard_tokens", "0"], "--shard_tokens must be >= 1"),
        "inside": (["--output", str(caches["v2"] / "sub")], "outside the old cache"),
        "a file": (["--output", str(tmp_path / "notes.txt")], "is a file"),
        "schema-2 there": (["--output", str(caches["v2"])], "outside the old cache"),
        # the same teacher cache in other shards: not what this upgrade writes
        "another cache": (["--output", str(caches["v3"]), "--shard_tokens", "4096"], "holds another teacher cache"),
    }
    (tmp_path / "notes.txt").write_text("not a folder")
    other = tmp_path / "other-v2"  # a schema-2 cache that is not the source
    shutil.copytree(caches["v2"], other)
    cases["other schema-2"] = (["--output", str(other)], "holds a schema-2 cache")
    v3_before = content_checksum(caches["v3"])
    for name, (args, says) in cases.items():
        with pytest.raises(SystemExit) as exit_:
            main(["cache-upgrade", str(caches["v2"]), *args])
        assert exit_.value.code == 2, name
        line = _error_line(capsys)
        assert says in line and "--writer." not in line, (name, line)
    assert not (tmp_path / "a").exists() and not (caches["v2"] / "sub").exists()
    assert content_checksum(caches["v3"]) == v3_before


def test_cache_upgrade_stopped_by_a_signal_says_so_and_a_rerun_resumes(caches, tmp_path, capsys, monkeypatch):
    from pd_lightning.cache.writer import CacheWriter

    out = tmp_path / "up"
    real, calls = CacheWriter.write_encoded, []

    def write_then_signal(self, encoded):
        calls.append(1)
        if len(calls) == 3:  # a few sequences in: shards finished before, one in progress
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, encoded)

    monkeypatch.setattr(CacheWriter, "write_encoded", write_then_signal)
    with pytest.raises(SystemExit) as exit_:
        main(["cache-upgrade", str(caches["v2"]), "--output", str(out)])
    assert exit_.value.code == 143
    assert "stopped by SIGTERM" in _error_line(capsys) and not list(out.glob("*.tmp"))
    monkeypatch.setattr(CacheWriter, "write_encoded", real)
    main(["cache-upgrade", str(caches["v2"]), "--output", str(out)])
    assert content_checksum(out) == content_checksum(caches["v3"])


def test_cache_plan_uses_a_sample_s_bytes_per_entry_only_at_its_vocabulary(caches):
    from pd_lightning.cache.inspect import SCHEMA3_BYTES_PER_ENTRY, cache_plan

    own = cache_info(caches["v3"])
    same = cache_plan(1e9, own["vocab_size"], from_cache=str(caches["v3"]))
    assert same["bytes_per_entry"] == pytest.approx(own["bytes_per_entry"])
    other = cache_plan(1e9, 151_552, from_cache=str(caches["v3"]))
    assert (
        other["bytes_per_entry"] == SCHEMA3_BYTES_PER_ENTRY and "not --vocab 151552" in other["bytes_per_entry_source"]
    )
    assert other["entries_per_token"] == same["entries_per_token"]  # the sample's entries/token still apply
