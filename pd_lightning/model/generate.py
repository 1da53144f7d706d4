"""Batched greedy decoding for the student, with a key/value cache.

Prompts of different lengths are left-padded to the longest, P tokens. Row b has ``pad_b`` padding positions; its
token at index t has RoPE position ``t - pad_b`` and attends to keys ``pad_b <= j <= t`` (a padding query attends
only to itself, so no softmax row is empty). This is what ``transformers``' ``generate`` does with a left-padded
batch and an attention mask, so the two produce the same tokens.

With ``use_cache=True`` the prompt is run once (prefill) and every new token is one forward of a single position
against the cached keys/values: n new tokens cost n single-position forwards. ``use_cache=False`` recomputes the
whole sequence at every step (the reference the cache is tested and benchmarked against).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pd_lightning.model.transformer import KVCache, Transformer


def _prefill_mask(valid: Tensor) -> Tensor:
    """(B, 1, T, T) boolean: causal, restricted to valid (non-padding) keys; padding queries see themselves."""
    T = valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return ((causal[None] & valid[:, None, :]) | eye[None]).unsqueeze(1)


@torch.inference_mode()
def greedy_generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    use_cache: bool = True,
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (lists of token ids), at most ``max_new_tokens`` each.

    A row stops after emitting ``eos_id`` (kept as its last token) or when ``stop(row, generated_so_far)`` returns
    True; finished rows leave the batch (and the cache). Returns the generated ids of each prompt, in order.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_generate: every prompt needs at least one token")
    device = model.embed.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    pads = torch.tensor([P - len(p) for p in prompts], device=device)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(list(p), dtype=torch.long, device=device)
    arange = torch.arange(P, device=device)
    valid = arange[None, :] >= pads[:, None]  # (B, P)
    positions = (arange[None, :] - pads[:, None]).clamp(min=0)
    padded = bool((pads > 0).any())
    out: list[list[int]] = [[] for _ in range(B)]
    rows = torch.arange(B, device=device)  # original index of each active row
    if max_new_tokens <= 0:
        return out

    total = P + max_new_tokens
    cache = KVCache(model.config, B, total, model.embed.weight.dtype, device) if use_cache else None
    key_valid = torch.cat([valid, torch.ones(B, max_new_tokens, dtype=torch.bool, device=device)], dim=1)
    seq = ids
    mask = _prefill_mask(valid) if padded else None
    if cache is not None and mask is None:
        hidden = model(ids, return_hidden=True, cache=cache)[:, -1]
    else:
        hidden = model(ids, return_hidden=True, positions=positions, mask=mask, cache=cache)[:, -1]

    for step in range(max_new_tokens):
        next_tok = model.lm_head(hidden).argmax(dim=-1)  # (b,)
        tokens = next_tok.tolist()
        keep = []
        for i, (row, tok) in enumerate(zip(rows.tolist(), tokens)):
            out[row].append(tok)
            done = (eos_id is not None and tok == eos_id) or (stop is not None and stop(row, out[row]))
            if not done:
                keep.append(i)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            sel = torch.tensor(keep, device=device)
            rows, pads, key_valid, next_tok, seq = rows[sel], pads[sel], key_valid[sel], next_tok[sel], seq[sel]
            if cache is not None:
                cache.select(sel)
        L = P + step + 1  # sequence length including the new token
        if cache is not None:
            pos = (P + step - pads)[:, None]
            mask = key_valid[:, None, None, :L] if padded else None
            hidden = model(next_tok[:, None], return_hidden=True, positions=pos, mask=mask, cache=cache)[:, -1]
        else:
            seq = torch.cat([seq, next_tok[:, None]], dim=1)
            ar = torch.arange(L, device=device)
            v = key_valid[:, :L]
            pos = (ar[None, :] - pads[:, None]).clamp(min=0)
            if padded:
                hidden = model(seq, return_hidden=True, positions=pos, mask=_prefill_mask(v))[:, -1]
            else:
                hidden = model(seq, return_hidden=True)[:, -1]
    return out
