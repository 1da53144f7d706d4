"""What a cache stores against fp64 references: Full() rows at large vocabularies, the stored tail mass in the
tail bucket, and WTTM's U_gamma computed from the full distribution (issue 7 items 2 and 3)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from pd_lightning.cache import CacheSpec, CacheWriter, TeacherCache
from pd_lightning.distill.losses import KLD
from pd_lightning.distill.processors import Full, LogitsProcessor, TopPK
from pd_lightning.distill.target import SparseTarget
from pd_lightning.distill.temperature import WTTM, Temperatures


def zipf_logits(n: int, vocab: int, seed: int, s: float = 1.1) -> torch.Tensor:
    """``(n, V)`` logits of Zipf-tailed rows (``p ~ rank^-s``, shuffled ids, a little noise)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    rows = []
    for _ in range(n):
        z = -s * ranks.log() + 0.3 * torch.randn(vocab, generator=g, dtype=torch.float64)
        rows.append(z[torch.randperm(vocab, generator=g)])
    return torch.stack(rows).float()


def cache_of(folder: Path, proc: LogitsProcessor, logits: torch.Tensor, seq_len: int, gammas=()) -> list[dict]:
    """Write ``logits`` ``(S * L, V)`` as ``S`` sequences and read them back."""
    n, vocab = logits.shape
    num = n // seq_len
    spec = CacheSpec.for_processor(
        proc, vocab_size=vocab, seq_len=seq_len, num_sequences=num, teacher_fingerprint="t",
        tokenizer_fingerprint="k", source_fingerprint="s", power_gammas=gammas,
    )  # fmt: skip
    writer = CacheWriter(folder, spec)
    for i in range(num):
        rows = logits[i * seq_len : (i + 1) * seq_len]
        writer.write(torch.tensor([i]), torch.zeros(1, seq_len + 1, dtype=torch.long), proc(rows, gammas=gammas))
    writer.finalize()
    cache = TeacherCache(folder)
    return [cache[i] for i in range(num)]


def test_full_cache_is_exact_at_large_vocabularies(tmp_path: Path) -> None:
    """Before: p < 1e-6 clamped to 1e-6 gave mass ~1.06 and median KL 0.052 nats at V = 65,536."""
    vocab, seq_len = 65_536, 4
    logits = zipf_logits(8, vocab, seed=1)
    items = cache_of(tmp_path, Full(), logits, seq_len)
    cached = torch.cat([it["teacher_logprobs"] for it in items]).double()  # (8, V), ids = arange
    assert torch.equal(items[0]["teacher_ids"][0], torch.arange(vocab))
    ref = torch.log_softmax(logits.double(), -1)
    kl = (ref.exp() * (ref - cached)).sum(-1)  # KL(teacher || cached)
    assert kl.median() < 1e-6 and kl.max() < 2e-6, kl  # the bound in Full's docstring
    assert (cached.exp().sum(-1) - 1).abs().max() < 1e-5
    top = ref.exp().max(-1).values
    assert ((cached.exp().max(-1).values - top).abs() / top).max() < 1e-3
    # every stored log-probability is within half a quantisation step (ln(1e6 V) / 32766) of the truth, plus the
    # shift of the read-time renormalisation (the row's log-mass error)
    assert (cached - ref).abs().max() < math.log(1e6 * vocab) / 32766 + 2e-4


def small_tail_logits(n: int, vocab: int, k: int, seed: int) -> torch.Tensor:
    """Rows whose top-``k`` keeps all but 1e-5 ... 4e-4 of the mass."""
    g = torch.Generator().manual_seed(seed)
    z = torch.zeros(n, vocab, dtype=torch.float64)
    tails = torch.logspace(-5, math.log10(4e-4), n, dtype=torch.float64)
    for r in range(n):
        head = torch.randn(k, generator=g, dtype=torch.float64)
        # tail mass t = (V - k) / ((V - k) + sum exp(head + c))  ->  c
        c = math.log((vocab - k) * (1 - tails[r]) / tails[r] / head.exp().sum())
        z[r, :k] = head + c
        z[r] = z[r][torch.randperm(vocab, generator=g)]
    return z.float()


def test_tail_bucket_uses_the_stored_tail_mass(tmp_path: Path) -> None:
    """Small tails (1e-5 ... 4e-4) are stored from the full distribution; the tail bucket uses them. Before, the
    tail was 1 - sum of the quantised kept entries, which rounds such tails to 0 or to the wrong size."""
    vocab, k, seq_len = 300, 40, 8
    logits = small_tail_logits(16, vocab, k, seed=3)
    items = cache_of(tmp_path, TopPK(1.0, k), logits, seq_len)
    batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
    target = SparseTarget.from_batch(batch)
    p = torch.softmax(logits.double(), -1)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter_(1, target.ids, True)
    exact_tail = torch.where(kept, 0.0, p).sum(-1)  # (16,)
    assert exact_tail.min() > 9e-6 and exact_tail.max() < 4.1e-4
    torch.testing.assert_close(target.tail.double(), exact_tail, rtol=2e-3, atol=3e-8)
    derived = 1 - target.logprobs.double().exp().sum(-1)  # what the quantised entries say
    assert ((derived - exact_tail).abs() / exact_tail).max() > 0.1  # why the tail must be stored

    # fp64 reference of the per-token KLD with the tail bucket, from the cached kept entries and the exact tail
    g = torch.Generator().manual_seed(5)
    student = torch.randn(16, vocab, generator=g, dtype=torch.float64) * 2
    s_logp = torch.log_softmax(student, -1)
    s_kept = s_logp.gather(1, target.ids)
    s_tail = torch.where(kept, -math.inf, s_logp).logsumexp(-1)
    t_kept = torch.log_softmax(target.logprobs.double(), -1) + (1 - exact_tail).log()[:, None]
    ref = (t_kept.exp() * (t_kept - s_kept)).sum(-1) + exact_tail * (exact_tail.log() - s_tail)
    loss = KLD(tail_bucket=True)
    counted = torch.ones(16, dtype=torch.bool)
    got = loss.token_losses(student.float(), target, counted)[0].double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_wttm_uses_the_stored_full_vocabulary_weight(tmp_path: Path) -> None:
    """U_gamma = sum_v p_v^gamma is computed by the teacher over the full vocabulary and stored; WTTM uses it.
    Before, it was modelled from the entropy: U / exact U had median 0.60 (0.33-1.08) on such rows."""
    vocab, seq_len, gamma = 32_000, 4, 0.5
    logits = zipf_logits(8, vocab, seed=7)
    items = cache_of(tmp_path, TopPK(0.95, 100), logits, seq_len, gammas=(gamma, 0.8))
    batch = {key: torch.stack([it[key] for it in items]) for key in items[0]}
    target = SparseTarget.from_batch(batch)
    p = torch.softmax(logits.double(), -1)
    for g in (gamma, 0.8):
        exact = p.pow(g).sum(-1)  # fp64 reference
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the stored value is used: no approximation warning
            got = WTTM(gamma=g).weight(target, vocab)
        torch.testing.assert_close(got.double(), exact, rtol=1e-3, atol=0)
    student = torch.randn(8, vocab)
    temps = WTTM(gamma=gamma)(student, target)
    assert isinstance(temps, Temperatures) and torch.allclose(temps.teacher, torch.full((8,), 2.0))
    # data without the stored weight: the approximation, with a warning naming the remedy
    bare = SparseTarget(target.ids, target.logprobs, target.std, target.entropy)
    with pytest.warns(UserWarning, match=r"--model.power_gammas \[0.5\]"):
        approx = WTTM(gamma=gamma).weight(bare, vocab)
    assert not torch.allclose(approx.double(), p.pow(gamma).sum(-1), rtol=1e-2)
