"""`pd-lightning cache-upgrade`: a schema-1 cache (one merged shard per writer rank) becomes a schema-2 cache with
the same entries, tokens and statistics; readers refuse the old one naming the command."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from pd_lightning.cache import CacheSpec, CacheWriter, TeacherCache, verify
from pd_lightning.cli import main
from pd_lightning.distill.processors import TopPK


def schema1_cache(folder, new_cache, world: int) -> None:
    """The schema-1 layout of ``new_cache``'s data: rank r holds sequences r, r + world, ... (as schema 1 did)."""
    folder.mkdir()
    cache = TeacherCache(new_cache)
    spec, length = cache.spec, cache.seq_len
    with h5py.File(cache.files[0]) as src:
        data = {k: src[k][:] for k in ("tokens", "counts", "entries", "std", "entropy")}
        offsets = src["sequence_offsets"][:]
    for r in range(world):
        rows = np.arange(r, spec.num_sequences, world)
        pos = (rows[:, None] * length + np.arange(length)).reshape(-1)
        entries = np.concatenate([data["entries"][offsets[i] : offsets[i + 1]] for i in rows])
        sizes = np.array([offsets[i + 1] - offsets[i] for i in rows])
        with h5py.File(folder / f"shard-{r:05d}-of-{world:05d}.h5", "w") as f:
            f["sequence_index"], f["sequence_offsets"] = rows, np.concatenate([[0], np.cumsum(sizes)])
            f["tokens"], f["entries"] = data["tokens"][rows], entries
            for name in ("counts", "std", "entropy"):
                f[name] = data[name][pos]
            attrs = {k: getattr(spec, k) for k in ("teacher_fingerprint", "tokenizer_fingerprint", "source_fingerprint",
                                                    "vocab_size", "seq_len", "num_sequences", "processor",
                                                    "capture_temperature")}  # fmt: skip
            f.attrs.update(attrs, format="pd-lightning-teacher-cache", schema_version=1, max_entries=spec.max_entries,
                           quant_bits=14, nlogp_max=float(np.log(1e6)), rank=r, world_size=world,
                           num_shard_sequences=len(rows), max_count=int(data["counts"].max()),
                           complete=True)  # fmt: skip


def test_upgrade_keeps_the_data(tmp_path, capsys) -> None:
    proc = TopPK(0.9, 12)
    spec = CacheSpec.for_processor(proc, vocab_size=300, seq_len=16, num_sequences=7, teacher_fingerprint="t",
                                   tokenizer_fingerprint="k", source_fingerprint="s")  # fmt: skip
    writer = CacheWriter(tmp_path / "new", spec, schema=2)  # schema1_cache copies its packed 'entries'
    for i in range(7):
        g = torch.Generator().manual_seed(i)
        writer.write(torch.tensor([i]), torch.randint(0, 300, (1, 17), generator=g),
                     proc(torch.randn(16, 300, generator=g) * 3))  # fmt: skip
    writer.finalize()
    schema1_cache(tmp_path / "old", tmp_path / "new", world=2)
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "old").iterdir())
    with pytest.raises(SystemExit) as e:
        main(["cache-info", str(tmp_path / "old")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "schema-1" in err and "pd-lightning cache-upgrade" in err
    main(["cache-upgrade", str(tmp_path / "old"), "--output", str(tmp_path / "up"), "--shard_tokens", "48"])
    assert "wrote" in capsys.readouterr().out
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "old").iterdir()) == before  # left unchanged
    verify(tmp_path / "up")
    up, ref = TeacherCache(tmp_path / "up"), TeacherCache(tmp_path / "new")
    assert json.loads(up.spec.processor) == json.loads(ref.spec.processor) and up.spec.num_shards == 3
    for i in range(7):
        a, b = up[i], ref[i]
        for key in ("input_ids", "labels", "teacher_ids", "teacher_logprobs", "teacher_std", "teacher_entropy"):
            assert torch.equal(a[key], b[key]), key
        derived = (1 - b["teacher_logprobs"].double().exp().sum(-1)).clamp(min=0)  # schema 1 had no tail
        torch.testing.assert_close(a["teacher_tail"].double(), derived, rtol=1e-3, atol=1e-4)
    with pytest.raises(SystemExit):
        main(["cache-upgrade", str(tmp_path / "old")])
    assert "--output" in capsys.readouterr().err
