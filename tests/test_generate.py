"""Incremental decoding with the KV cache against full recomputation and against transformers' generate."""

from __future__ import annotations

import pytest
import torch

from pd_lightning.model.config import StudentConfig
from pd_lightning.model.generate import greedy_generate
from pd_lightning.model.hf import export_hf
from pd_lightning.model.transformer import KVCache, Transformer


def _model(groups: int = 2, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = StudentConfig(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_query_groups=groups, intermediate_size=64)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_cached_logits_equal_full_recomputation(groups):
    """Prefill 5 positions, then a 3-position chunk, then one position at a time: each step's logits equal the
    logits of one forward over the whole sequence at those positions."""
    model = _model(groups)
    x = torch.randint(0, 97, (2, 14))
    with torch.no_grad():
        full = model(x)  # (B, T, V)
        cache = KVCache(model.config, 2, 14, torch.float32)
        parts = [model(x[:, :5], cache=cache), model(x[:, 5:8], cache=cache)]
        parts += [model(x[:, t : t + 1], cache=cache) for t in range(8, 14)]
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_left_padded_rows_equal_unpadded_rows():
    """A left-padded row of a batch gives the same logits as the same prompt alone (positions and mask per row)."""
    from pd_lightning.model.generate import _prefill_mask

    model = _model()
    short, long = [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]
    ids = torch.tensor([[0] * 5 + short, long])
    valid = torch.tensor([[False] * 5 + [True] * 3, [True] * 8])
    pos = (torch.arange(8)[None] - torch.tensor([[5], [0]])).clamp(min=0)
    with torch.no_grad():
        batched = model(ids, positions=pos, mask=_prefill_mask(valid))
        alone = model(torch.tensor([short]))
    torch.testing.assert_close(batched[0, 5:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], model(torch.tensor([long]))[0].detach(), atol=1e-5, rtol=1e-5)


def test_greedy_with_cache_equals_without_and_unbatched():
    model = _model()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    cached = greedy_generate(model, prompts, 24)
    recomputed = greedy_generate(model, prompts, 24, use_cache=False)
    alone = [greedy_generate(model, [p], 24)[0] for p in prompts]
    assert cached == recomputed == alone
    assert all(len(g) == 24 for g in cached)


def test_greedy_equals_transformers_generate(tmp_path):
    """The reference: transformers' LlamaForCausalLM.generate on the exported student, same left-padded batch."""
    from transformers import AutoModelForCausalLM

    model = _model(seed=3)
    export_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    P = max(map(len, prompts))
    ids = torch.zeros(3, P, dtype=torch.long)
    attn = torch.zeros(3, P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :], attn[i, P - len(p) :] = torch.tensor(p), 1
    n = 16
    ref = hf.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, do_sample=False, eos_token_id=None)
    ours = greedy_generate(model, prompts, n)
    assert ours == ref[:, P:].tolist()


def test_eos_and_stop_callback_end_rows_early():
    model = _model()
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    free = greedy_generate(model, prompts, 12)
    eos = free[0][3]  # the 4th token row 0 emits
    out = greedy_generate(model, prompts, 12, eos_id=eos)
    assert out[0] == free[0][: free[0].index(eos) + 1]
    assert out[1] == (free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1])
    stopped = greedy_generate(model, prompts, 12, stop=lambda row, gen: row == 1 and len(gen) == 5)
    assert stopped == [free[0], free[1][:5]]


def test_cache_overflow_is_refused():
    model = _model()
    cache = KVCache(model.config, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.tensor([[1, 2, 3, 4, 5]]), cache=cache)
