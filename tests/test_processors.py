"""LogitsProcessor variants against hand-computed cases and naive fp64 numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pd_lightning.distill import processors
from pd_lightning.distill.processors import Full, Sampled, TopPK, position_keys, uniform_hash


def _logits(n: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _ref_logprobs(logits: torch.Tensor) -> np.ndarray:
    z = logits.double().numpy()
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ref_top_p_k(logits: torch.Tensor, p: float, k: int | None) -> list[dict[int, float]]:
    """Naive top-p-k per row in fp64: sort, cumulative sum, smallest prefix reaching p, cap at k."""
    out = []
    for row in _ref_logprobs(logits):
        order = np.argsort(-row, kind="stable")
        cum = np.cumsum(np.exp(row[order]))
        nucleus = int(np.searchsorted(cum, p) + 1) if p < 1 else len(row)  # first index with cum >= p
        keep = min(nucleus, len(row)) if k is None else min(nucleus, k, len(row))
        out.append({int(i): float(row[i]) for i in order[:keep]})
    return out


def _as_dicts(ids: torch.Tensor, values: torch.Tensor) -> list[dict[int, float]]:
    return [
        {int(i): float(v) for i, v in zip(r_ids, r_vals) if math.isfinite(v)}
        for r_ids, r_vals in zip(ids.tolist(), values.tolist())
    ]


def test_top_p_k_hand_computed() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log() + 1.7  # a shift changes nothing
    cases = {(0.75, 100): [1, 3], (0.9, 100): [1, 3, 2], (0.4, 100): [1], (0.9, 1): [1], (1.0, 3): [1, 3, 2]}
    for (p, k), expected in cases.items():
        target = TopPK(p=p, k=k)(logits)
        kept = target.ids[0][torch.isfinite(target.logprobs[0])].tolist()
        assert kept == expected, (p, k)
        assert torch.allclose(target.logprobs[0, : len(expected)], probs[0, expected].log(), atol=1e-6)
        assert target.ids.shape[1] == min(k, 4)  # padded to k (capped by the vocabulary)
    assert float(TopPK(0.75, 100)(logits).kept_mass) == pytest.approx(0.8, abs=1e-6)


@pytest.mark.parametrize("p,k", [(0.95, 100), (0.8, 20), (0.5, 5), (1.0, 7), (0.9, None), (0.99, 1)])
def test_top_p_k_matches_fp64_reference(p: float, k: int | None) -> None:
    logits = _logits(64, 1000, seed=1)
    target = TopPK(p=p, k=k)(logits)
    got, ref = _as_dicts(target.ids, target.logprobs), _ref_top_p_k(logits, p, k)
    for g, r in zip(got, ref):
        assert g.keys() == r.keys()
        assert max(abs(g[i] - r[i]) for i in r) < 1e-5
    if k is not None:
        assert target.ids.shape == (64, k)
    else:  # unlimited: padded to the most kept in the batch
        assert target.ids.shape[1] == max(len(r) for r in ref)
    assert (target.ids[~target.valid] == 0).all()


def test_top_k_only_and_top_p_only() -> None:
    logits = _logits(32, 500, seed=2)
    target = TopPK(p=1.0, k=10)(logits)
    assert torch.equal(target.ids, logits.topk(10, dim=-1).indices)
    assert target.valid.all()
    nucleus = TopPK(p=0.9, k=None)(logits)
    assert (nucleus.kept_mass >= 0.9 - 1e-6).all()
    # dropping the smallest kept entry must fall below p (smallest prefix)
    smallest = nucleus.logprobs.masked_fill(~nucleus.valid, math.inf).min(-1).values.exp()
    assert (nucleus.kept_mass - smallest < 0.9).all()


def test_statistics_match_fp64_reference() -> None:
    logits = _logits(16, 3000, seed=3, scale=4.0)
    target = TopPK()(logits.to(torch.bfloat16))
    z = logits.to(torch.bfloat16).double().numpy()
    lp = _ref_logprobs(torch.from_numpy(z))
    np.testing.assert_allclose(target.std.numpy(), z.std(-1, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(target.entropy.numpy(), -(np.exp(lp) * lp).sum(-1), rtol=1e-4)
    assert target.logprobs.dtype == torch.float32 and target.ids.dtype == torch.int64


def test_chunking_is_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    logits = _logits(40, 300, seed=4)
    keys = torch.arange(40) * 7
    for proc in (TopPK(0.9, None), TopPK(0.95, 10), Sampled(16), Full()):
        whole = proc(logits, keys)
        monkeypatch.setattr(processors, "_CHUNK_ELEMENTS", 300 * 3)  # 3 rows per chunk
        chunked = proc(logits, keys)
        monkeypatch.undo()
        assert torch.equal(whole.ids, chunked.ids) and torch.equal(whole.logprobs, chunked.logprobs), proc
        assert torch.allclose(whole.std, chunked.std) and torch.allclose(whole.entropy, chunked.entropy)


def test_full_is_log_softmax_and_refuses_large_vocab() -> None:
    logits = _logits(4, 100)
    target = Full()(logits)
    assert torch.equal(target.ids[0], torch.arange(100))
    np.testing.assert_allclose(target.logprobs.numpy(), _ref_logprobs(logits), atol=1e-5)
    with pytest.raises(ValueError, match="max_vocab_size=50"):
        Full(max_vocab_size=50)(logits)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: TopPK(p=0.0), "p=0.0"),
        (lambda: TopPK(p=1.5), "p=1.5"),
        (lambda: TopPK(p=float("nan")), "p=nan"),
        (lambda: TopPK(k=0), "k=0"),
        (lambda: TopPK(k=-3), "k=-3"),
        (lambda: TopPK(k=2.5), "k=2.5"),
        (lambda: Sampled(n=0), "n=0"),
        (lambda: Sampled(n=4, proposal_temperature=0.0), "proposal_temperature"),
        (lambda: Full(max_vocab_size=0), "max_vocab_size=0"),
    ],
)
def test_bad_parameters_are_named(make, name: str) -> None:
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        make()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits_name_the_row(bad: float) -> None:
    logits = _logits(10, 50)
    logits[7, 3] = bad
    for proc in (TopPK(), Sampled(4), Full()):
        with pytest.raises(ValueError, match="row 7"):
            proc(logits)


def test_hparams_rebuild_the_processor() -> None:
    for proc in (TopPK(0.9, None), Sampled(12, 2.0, seed=5), Full(1000)):
        hp = proc.hparams()
        assert hp["class_path"].endswith(type(proc).__name__)
        assert type(proc)(**hp["init_args"]).hparams() == hp


def _splitmix64(x: int) -> int:
    m = (1 << 64) - 1
    x &= m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def test_uniform_hash_matches_python_splitmix64() -> None:
    g = 0x9E3779B97F4A7C15
    keys = torch.tensor([0, 1, 12345, 2**40 + 3])
    got = uniform_hash(keys, 5, seed=42)
    state = _splitmix64(42 + g)
    for r, key in enumerate(keys.tolist()):
        for d in range(5):
            x = (_splitmix64(key * g + state) + (d + 1) * g) & ((1 << 64) - 1)
            assert got[r, d].item() == (_splitmix64(x) >> 11) * 2.0**-53
    assert (got >= 0).all() and (got < 1).all()


def test_sampled_is_unbiased() -> None:
    vocab, n, rows = 20, 8, 20000
    logits = _logits(1, vocab, seed=6, scale=1.5).expand(rows, vocab)
    p = torch.softmax(logits[0].double(), -1)
    target = Sampled(n=n, seed=1)(logits, torch.arange(rows))
    weights = target.logprobs.double().exp()  # (rows, n)
    assert torch.allclose(weights.sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-6)
    dense = torch.zeros(rows, vocab, dtype=torch.float64).scatter_add_(1, target.ids, weights)
    sigma = (p * (1 - p) / (n * rows)).sqrt()  # std of the mean of c_i / n
    z = (dense.mean(0) - p).abs() / sigma
    assert z.max() < 4.5, z
    # entries are unique, sorted ids with weights k/n
    valid = target.valid
    assert ((target.ids[:, 1:] > target.ids[:, :-1]) | ~valid[:, 1:]).all()
    counts = (weights * n).round()
    assert torch.allclose(weights[valid], counts[valid] / n, atol=1e-6)


def test_sampled_with_proposal_temperature_is_consistent() -> None:
    vocab, rows = 30, 4000
    logits = _logits(1, vocab, seed=7, scale=2.0).expand(rows, vocab)
    p = torch.softmax(logits[0].double(), -1)
    target = Sampled(n=64, proposal_temperature=2.0)(logits, torch.arange(rows))
    dense = torch.zeros(rows, vocab, dtype=torch.float64).scatter_add_(1, target.ids, target.logprobs.double().exp())
    assert torch.allclose(dense.sum(-1), torch.ones(rows, dtype=torch.float64), atol=1e-6)
    assert (dense.mean(0) - p).abs().max() < 0.01  # self-normalised: bias O(1/n)


def test_sampled_is_reproducible_per_key() -> None:
    logits = _logits(24, 200, seed=8)
    keys = position_keys(torch.tensor([5, 9, 11]), 8)
    assert torch.equal(keys[:3], torch.tensor([40, 41, 42]))
    proc = Sampled(n=16, seed=3)
    a = proc(logits, keys)
    b = Sampled(n=16, seed=3)(logits[8:16], keys[8:16])  # another batch holding sequence 9 only
    assert torch.equal(a.ids[8:16], b.ids) and torch.equal(a.logprobs[8:16], b.logprobs)
    c = Sampled(n=16, seed=4)(logits, keys)
    assert not torch.equal(a.ids, c.ids)
    assert a.ids.shape == (24, 16)
