"""The cache writer with a cross-tokenizer cache's rows (issue 20): positions with no entry at all (unaligned: every
log p -inf, tail 0), including whole sequences and a whole shard of them, in schemas 2 and 3; and the spec's
cross-tokenizer fields, absent from same-tokenizer caches and from caches written before they existed."""

from __future__ import annotations

import json

import h5py
import pytest
import torch

from pd_lightning.cache.format import CacheSpec, read_layout
from pd_lightning.cache.reader import TeacherCache
from pd_lightning.cache.writer import CacheWriter
from pd_lightning.distill.target import SparseTarget

L, K, V, N = 16, 4, 50, 6


def target(n_seq: int, empty: torch.Tensor, seed: int) -> SparseTarget:
    """Random sorted top-K rows over ``V`` ids; rows where ``empty`` holds no entry and zero statistics."""
    g = torch.Generator().manual_seed(seed)
    lp, ids = torch.log_softmax(torch.randn(n_seq * L, V, generator=g) * 3, -1).topk(K)
    lp[empty], ids[empty] = float("-inf"), 0
    zero = torch.where(empty, 0.0, 1.0)
    return SparseTarget(ids, lp, std=torch.rand(n_seq * L, generator=g) * zero,
                        entropy=torch.rand(n_seq * L, generator=g) * zero, tail=(1 - lp.exp().sum(-1)) * zero,
                        power_sums={0.5: torch.rand(n_seq * L, generator=g) * zero})  # fmt: skip


def spec(**extra) -> CacheSpec:
    return CacheSpec(
        teacher_fingerprint="t", tokenizer_fingerprint="s", source_fingerprint="val:x", vocab_size=V, seq_len=L,
        num_sequences=N, max_entries=K, processor="{}", sequences_per_shard=2, power_gammas=(0.5,), **extra,
    )  # fmt: skip


@pytest.mark.parametrize("schema", [2, 3])
def test_rows_with_no_entry_are_written_and_read_back(tmp_path, schema):
    """Sequences 0-1 (shard 0) hold no entry at all, sequence 2 none in its first half, the others every third
    position empty: counts 0 are stored there, and every value reads back (ids, log-probs within the stored step,
    statistics within float16)."""
    empty = torch.zeros(N * L, dtype=torch.bool)
    empty[: 2 * L] = True
    empty[2 * L : 2 * L + L // 2] = True
    empty[3 * L :: 3] = True
    t = target(N, empty, 0)
    tokens = torch.randint(0, V, (N, L + 1), generator=torch.Generator().manual_seed(1))
    s = spec(teacher_tokenizer_fingerprint="other", vocab_map_rule="tail")
    with CacheWriter(tmp_path / "c", s, schema=schema) as w:
        w.write(torch.arange(N), tokens, t)
        w.finalize()
    with h5py.File(tmp_path / "c" / "shard-000000.h5") as f:
        assert int(f.attrs["num_entries"]) == 0 and not f["counts"][()].any()
        assert f.attrs["teacher_tokenizer_fingerprint"] == "other"
    cache = TeacherCache(tmp_path / "c")
    assert cache.spec == s
    step = s.nlogp_max / 16383
    for i in range(N):
        item = cache.read(i)
        rows = slice(i * L, (i + 1) * L)
        valid = torch.isfinite(t.logprobs[rows])
        assert torch.equal(torch.isfinite(item["teacher_logprobs"]), valid)
        assert torch.equal(item["teacher_ids"][valid], t.ids[rows][valid])
        assert torch.allclose(item["teacher_logprobs"][valid], t.logprobs[rows][valid], atol=step / 2 + 1e-6)
        assert torch.allclose(item["teacher_tail"], t.tail[rows], rtol=1e-3, atol=1e-7)
        assert torch.equal(item["teacher_tail"][empty[rows]], torch.zeros(int(empty[rows].sum())))


def test_same_tokenizer_spec_leaves_no_trace_and_old_specs_read(tmp_path):
    """A same-tokenizer spec's attributes and index JSON hold no cross-tokenizer key (so they are those of the
    caches written before the fields existed), and such attributes and JSON read back with the defaults; a
    half-set cross-tokenizer spec is refused."""
    s = spec()
    attrs, doc = s.to_attrs(), s.to_json()
    assert "teacher_tokenizer_fingerprint" not in attrs and "vocab_map_rule" not in doc
    assert CacheSpec.from_attrs(attrs, "x") == s and CacheSpec.from_json(json.loads(json.dumps(doc)), "x") == s
    x = spec(teacher_tokenizer_fingerprint="other", vocab_map_rule="prefix")
    assert CacheSpec.from_attrs(x.to_attrs(), "x") == x and CacheSpec.from_json(x.to_json(), "x") == x
    assert x.describe_difference(s) == "teacher_tokenizer_fingerprint: 'other' != ''; vocab_map_rule: 'prefix' != ''"
    with pytest.raises(ValueError, match="vocab_map_rule"):
        spec(teacher_tokenizer_fingerprint="other")
    with CacheWriter(tmp_path / "c", s, schema=2) as w:
        w.write(
            torch.arange(N),
            torch.zeros(N, L + 1, dtype=torch.int64),
            target(N, torch.zeros(N * L, dtype=torch.bool), 0),
        )
        w.finalize()
    assert read_layout(tmp_path / "c").spec == s
    assert "vocab_map_rule" not in (tmp_path / "c" / "index.json").read_text()
