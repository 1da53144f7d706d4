"""Schema 3 end to end through the CLI as users run it (issue 19): `predict` writes it by default, `--writer.schema 2`
the old format, `cache-upgrade` converts 2 -> 3 into exactly what a fresh schema-3 `predict` writes, and a student
trained from either cache is the same student (the two schemas hold the same quantised values)."""

from __future__ import annotations

import os
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
    assert info3["max_abs_logprob_error"] == info2["max_abs_logprob_error"] < 4.3e-4
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
