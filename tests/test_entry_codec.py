"""The entry codec (pd_lightning/cache/codec.py): exact ids, |Δ log p| <= 1e-3 against fp64, corrupt blocks."""

from __future__ import annotations

import numpy as np
import pytest

from pd_lightning.cache import codec as ec

BOUND = 1e-3


def top_p_k(logits: np.ndarray, p: float = 0.95, k: int = 100) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fp64 top-p-k of ``(T, V)`` logits: counts, ids, -log p (descending probability per row), as the cache."""
    z = logits.astype(np.float64)
    lp = z - z.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    order = np.argsort(-lp, axis=-1, kind="stable")[:, :k]  # (T, k)
    vals = np.take_along_axis(lp, order, -1)
    before = np.cumsum(np.exp(vals), -1) - np.exp(vals)
    keep = before < p
    return keep.sum(-1), order[keep], -vals[keep]


def roundtrip(counts, ids, nlogp, table, step=ec.DEFAULT_STEP, truth=None):
    block = ec.encode_block(counts, ids, nlogp, table, step=step)
    out_ids, out_nlogp = ec.decode_block(block, counts, table)
    assert out_ids.dtype == np.int64 and out_nlogp.dtype == np.float32
    np.testing.assert_array_equal(out_ids, np.asarray(ids, dtype=np.int64))
    ref = np.asarray(nlogp if truth is None else truth, dtype=np.float64)
    if ref.size:
        assert np.abs(out_nlogp.astype(np.float64) - ref).max() <= BOUND
    return block, out_nlogp


@pytest.mark.parametrize("peak", [1.0, 25.0])
@pytest.mark.parametrize("vocab", [4096, 151_552])
def test_roundtrip_random_and_peaked(vocab, peak):
    """Random (peak 1) and peaked (peak 25: many p ~ 1 rows, count 1) distributions; fp32 input, fp64 truth."""
    rng = np.random.default_rng(vocab + int(peak))
    logits = rng.standard_normal((64, 4096)) * peak
    counts, ids, nlogp = top_p_k(logits)
    ids = rng.permutation(vocab)[ids] if vocab != 4096 else ids  # a fixed one-to-one map of the ids
    table = ec.build_id_table(ids[: ids.size // 3], vocab)  # a sample: the rest take ranks in id order
    roundtrip(counts, ids, nlogp.astype(np.float32), table, truth=nlogp)
    if peak > 1:
        assert (counts == 1).any() and (nlogp < 1e-6).any()


def test_rows_of_every_shape():
    """0, 1 and k entries, ties, p = 1.0 rows (nlogp 0), the vocabulary's edge ids, tiny negative zeros."""
    v = 4096
    counts = np.array([1, 0, 3, 100, 1, 2, 0, 5])
    rows = [
        ([0], [0.0]),  # p = 1.0
        ([], []),
        ([v - 1, 0, 7], [0.1, 0.1, 0.1]),  # ties
        (list(range(v - 100, v)), list(np.linspace(0.5, 13.8, 100))),
        ([v - 1], [-1e-7]),  # log-softmax rounding: log p slightly above 0
        ([0, v - 1], [0.0, 0.0]),  # tie at p = 0.5 each... as quantised
        ([], []),
        ([5, 4, 3, 2, 1], [2.0, 2.0, 2.0005, 3.0, 13.815]),
    ]
    ids = np.concatenate([np.array(r[0], dtype=np.int64) for r in rows])
    nlogp = np.concatenate([np.array(r[1], dtype=np.float64) for r in rows])
    assert ids.size == counts.sum()
    for table in (ec.build_id_table(ids, v), ec.build_id_table([], v), ec.build_id_table([v - 1], v)):
        _, out = roundtrip(counts, ids, nlogp, table, truth=np.maximum(nlogp, 0))
        assert out[0] == 0.0 and out[counts[:4].sum()] == 0.0  # p = 1.0 rows decode to exactly log p = 0


def test_single_row_and_empty_blocks():
    table = ec.build_id_table([3, 1], 10)
    roundtrip(np.array([1]), np.array([9]), np.array([0.0]), table)
    roundtrip(np.array([0, 0]), np.zeros(0, np.int64), np.zeros(0), table)
    roundtrip(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), table)


def test_huge_vocabulary_and_wide_values():
    """V = 2^31: escaped ranks need 4 more byte planes; -log p beyond 2^16 steps uses 32-bit deltas."""
    v = ec.MAX_VOCAB
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 40, 300)
    e = int(counts.sum())
    ids = rng.integers(0, v, e)
    ids[:4] = [0, v - 1, v - 2, 1]
    nlogp = np.sort(rng.exponential(30.0, e))  # up to ~300 nats: codes past 2^16
    nlogp[: counts[0]] = np.sort(nlogp[: counts[0]])
    table = ec.build_id_table(np.concatenate([ids[::3], [v - 1]]), v)
    block, _ = roundtrip(counts, ids, nlogp, table, step=1e-3)  # up to ~300 nats: float32 rounding grows
    h = ec.read_header(block)
    assert (h.rank_ext_planes, h.value_planes, h.vocab_size) == (4, 4, v) and 0 < h.n_escaped < e


def test_any_order_is_exact():
    """Rows out of probability order only cost bits: the wrapped differences still decode exactly."""
    rng = np.random.default_rng(2)
    counts = rng.integers(0, 30, 200)
    e = int(counts.sum())
    ids, nlogp = rng.integers(0, 500, e), rng.uniform(0, 13.8, e)
    roundtrip(counts, ids, nlogp, ec.build_id_table(ids[:100], 500), step=1e-3)


def test_id_table_is_a_bijection_and_serialises():
    rng = np.random.default_rng(3)
    v = 3000
    table = ec.build_id_table(rng.integers(0, v, 5000) ** 2 % v, v, max_size=200)
    ranks = table.ranks(np.arange(v))
    np.testing.assert_array_equal(np.sort(ranks), np.arange(v))
    np.testing.assert_array_equal(table.lookup(ranks.astype(np.intp)), np.arange(v))
    np.testing.assert_array_equal(ranks[table.ids], np.arange(len(table)))  # table ids first, by frequency
    again = ec.IdTable.from_bytes(table.to_bytes())
    assert again.crc == table.crc and again.vocab_size == v
    np.testing.assert_array_equal(again.ids, table.ids)
    big = ec.build_id_table([5, 2**31 - 1, 5, 0], 2**31)  # searchsorted path (no dense array)
    x = np.array([0, 1, 5, 6, 2**31 - 2, 2**31 - 1])
    np.testing.assert_array_equal(big.lookup(big.ranks(x).astype(np.intp)), x)
    assert list(big.ranks(np.array([5, 0, 2**31 - 1]))) == [0, 1, 2]
    with pytest.raises(ValueError, match="distinct"):
        ec.IdTable(10, np.array([1, 1]))
    with pytest.raises(ValueError, match="vocab_size"):
        ec.build_id_table([1], 2**31 + 1)
    blob = bytearray(table.to_bytes())
    blob[-3] ^= 0xFF
    with pytest.raises(ValueError, match="id table"):
        ec.IdTable.from_bytes(bytes(blob))


def _block():
    rng = np.random.default_rng(4)
    counts, ids, nlogp = top_p_k(rng.standard_normal((32, 512)) * 3, k=50)
    table = ec.build_id_table(ids, 512)
    return counts, ids, nlogp, table, ec.encode_block(counts, ids, nlogp, table)


def test_truncated_or_corrupt_blocks_raise():
    counts, ids, nlogp, table, block = _block()
    for cut in (0, 10, ec.read_header(block).header_size, len(block) - 1):
        with pytest.raises(ValueError, match="truncated"):
            ec.decode_block(block[:cut], counts, table)
    with pytest.raises(ValueError, match="trailing bytes"):
        ec.decode_block(block + b"\0", counts, table)
    with pytest.raises(ValueError, match="not an entry block"):
        ec.decode_block(b"XXXX" + block[4:], counts, table)
    h = ec.read_header(block)
    hits = set()
    for pos in list(range(8, h.header_size)) + list(range(h.header_size, len(block), 97)):
        bad = bytearray(block)
        bad[pos] ^= 0x5A
        with pytest.raises(ValueError) as err:
            ec.decode_block(bytes(bad), counts, table)
        hits.add(str(err.value).split(":")[0].split(" (")[0])
    assert any("header is corrupt" in m for m in hits) and any("plane" in m for m in hits), hits


def test_counts_or_table_other_than_the_blocks_raise():
    counts, ids, nlogp, table, block = _block()
    with pytest.raises(ValueError, match="counts do not match.*positions"):
        ec.decode_block(block, counts[:-1], table)
    moved = counts.copy()
    i = int(np.flatnonzero(moved > 1)[0])
    moved[i] -= 1
    moved[i + 1] += 1  # same total, other rows: a decode would run past a row
    with pytest.raises(ValueError, match="counts/position checksum"):
        ec.decode_block(block, moved, table)
    with pytest.raises(ValueError, match="counts/position checksum"):  # the same rows, another place
        ec.decode_block(block, counts, table, position=1)
    placed = ec.encode_codes(counts, ids, np.rint(nlogp / ec.DEFAULT_STEP), table, ec.DEFAULT_STEP, position=7)
    assert ec.decode_block(placed, counts, table, position=7)[0].tolist() == ids.tolist()
    with pytest.raises(ValueError, match="counts/position checksum"):
        ec.decode_block(placed, counts, table)
    other = ec.build_id_table(ids[:10], 512)
    with pytest.raises(ValueError, match="id table"):
        ec.decode_block(block, counts, other)


def test_encode_refuses_bad_input():
    table = ec.build_id_table([], 100)
    c = np.array([2])
    with pytest.raises(ValueError, match="vocab_size=100"):
        ec.encode_block(c, np.array([0, 100]), np.array([0.0, 1.0]), table)
    with pytest.raises(ValueError, match="finite"):
        ec.encode_block(c, np.array([0, 1]), np.array([0.0, np.nan]), table)
    with pytest.raises(ValueError, match="must lie in"):
        ec.encode_block(c, np.array([0, 1]), np.array([-0.5, 1.0]), table)
    with pytest.raises(ValueError, match="counts sum to 2"):
        ec.encode_block(c, np.array([0]), np.array([0.0]), table)
    with pytest.raises(ValueError, match="step"):
        ec.encode_block(c, np.array([0, 1]), np.array([0.0, 1.0]), table, step=0.0)


@pytest.mark.parametrize("vocab", [512, 151_552, ec.MAX_VOCAB])
def test_torch_assembly_equals_numpy(vocab):
    """The planes assembled by torch (the training device's path) give exactly the numpy decode."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 60, 100)
    e = int(counts.sum())
    ids = rng.integers(0, min(vocab, 5000), e) * (vocab // min(vocab, 5000))
    ids[:2] = [0, vocab - 1]
    nlogp = rng.uniform(0, 13.8 if vocab < ec.MAX_VOCAB else 200.0, e)
    for table in (ec.build_id_table(ids[: e // 4], vocab), ec.build_id_table([], vocab)):
        block = ec.encode_block(counts, ids, nlogp, table)
        h, planes = ec.decompress_planes(block, counts, table)
        ids_t, nlogp_t = ec.assemble_torch(h, [torch.from_numpy(p.copy()) for p in planes], *table.tensors())
        ref_ids, ref_nlogp = ec.decode_block(block, counts, table)
        np.testing.assert_array_equal(ids_t.numpy(), ref_ids)
        np.testing.assert_array_equal(nlogp_t.numpy(), ref_nlogp)


def test_value_width_switches_at_2_15_codes():
    """Differences are read as int16 while every code is below 2^15, else as int32: both exact, any order."""
    table = ec.build_id_table([], 8)
    step = 1e-3
    for top, planes in ((2**15 - 1, 2), (2**15, 4)):
        nlogp = np.array([0.0, top * step, 0.0, top * step, 1.0, top * step]) + 1e-6
        block, out = roundtrip(np.array([2, 1, 3]), np.arange(6) % 8, nlogp, table, step=step)
        assert ec.read_header(block).value_planes == planes
        assert np.abs(out - nlogp).max() <= step / 2 + 1e-5
