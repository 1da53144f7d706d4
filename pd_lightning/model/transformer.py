"""The student: a plain-PyTorch decoder-only transformer (Llama layout: RMSNorm, RoPE, SwiGLU, GQA).

Numerically it follows ``transformers``' ``LlamaForCausalLM`` (fp32 RMSNorm, half-split rotary embedding,
``repeat_kv`` head grouping), so weights move between the two unchanged (see ``hf.py``). For decoding, ``forward``
also takes per-row RoPE positions, a boolean attention mask and a ``KVCache`` (see ``generate.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pd_lightning.model.config import StudentConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the compute dtype, as Llama does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cache(seq_len: int, head_dim: int, base: float, device: torch.device | None) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of shape (T, head_dim) for the half-split rotary embedding."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, D); cos/sin: (T, D)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to ``max_len`` positions.

    ``k[i]``/``v[i]`` have shape (B, G, max_len, D); positions ``[0, length)`` are filled. A forward call with a
    cache appends its T new positions at ``length`` and advances it, so decoding n tokens after a P-token prompt
    costs O((P + n) * n) attention work instead of the O((P + n)^2 * n) of recomputing the whole sequence each step.
    """

    def __init__(
        self, cfg: StudentConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        shape = (batch, cfg.n_query_groups, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.max_len, self.length = max_len, 0

    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows`` (drop finished sequences)."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]

    def copies(self, n: int) -> KVCache:
        """A new cache of ``n`` rows, each a copy of this one-row cache (rows that continue one shared prefix)."""
        if self.k and self.k[0].shape[0] != 1:
            raise ValueError(f"copies() needs a one-row cache, this one has {self.k[0].shape[0]} rows")
        out = KVCache.__new__(KVCache)
        out.k = [k.expand(n, -1, -1, -1).clone() for k in self.k]
        out.v = [v.expand(n, -1, -1, -1).clone() for v in self.v]
        out.max_len, out.length = self.max_len, self.length
        return out


class Attention(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.n_query_groups, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_query_groups * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_query_groups * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        kv: tuple[Tensor, Tensor, int] | None = None,
    ) -> Tensor:
        """``mask``: boolean (B, 1, T, S), True = may attend (None = causal over the T positions). ``kv``:
        (key buffer, value buffer, start) of a ``KVCache``: the T new keys/values are written at ``start`` and the
        queries attend to the S = start + T cached positions."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k_buf, v_buf, start = kv
            k_buf[:, :, start : start + T] = k
            v_buf[:, :, start : start + T] = v
            k, v = k_buf[:, :, : start + T], v_buf[:, :, : start + T]
        # Query head h reads key/value group h // (H / G), as Llama's repeat_kv does.
        gqa = self.n_kv != self.n_head
        if mask is None:
            # Without a cache, or into an empty one (a prefill: S == T): causal. Into a filled cache with no mask,
            # T == 1 (``Transformer.forward`` builds the offset mask for T > 1): the new position sees every key.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=kv is None or kv[2] == 0, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, kv: tuple | None = None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, kv)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM. ``forward`` returns logits (B, T, V), or the final normed hidden states (B, T, C) with
    ``return_hidden=True`` so a fused loss can apply ``lm_head`` chunk by chunk itself."""

    def __init__(self, cfg: StudentConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        # GPT-2 style: residual output projections scaled down with depth.
        out_std = std / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def output_weight(self) -> Tensor:
        """(V, C) weight of the output head."""
        return self.lm_head.weight

    def forward(
        self,
        input_ids: Tensor,
        return_hidden: bool = False,
        *,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Logits (B, T, V) or hidden states (B, T, C) of ``input_ids`` (B, T).

        Training uses only ``input_ids``: positions 0..T-1 and a causal mask. Batched decoding of left-padded
        prompts passes ``positions`` (B, T) (each row's RoPE position), a boolean ``mask`` (B, 1, T, S) and a
        ``cache`` (a ``KVCache`` whose ``length`` is the start of these T positions; S = length + T); see
        ``pd_lightning.model.generate``.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        x = self.embed(input_ids)  # (B, T, C)
        if positions is None:
            cos, sin = rope_cache(start + T, self.config.head_dim, self.config.rope_base, input_ids.device)
            cos, sin = cos[start:], sin[start:]  # (T, D)
        else:
            n = int(positions.max()) + 1
            cos, sin = rope_cache(n, self.config.head_dim, self.config.rope_base, input_ids.device)
            cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (B, 1, T, D)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, asked to write up to {start + T}")
        if cache is not None and mask is None and T > 1 and start > 0:
            # Causal with an offset: new position i (absolute start + i) sees keys 0..start + i.
            q_abs = torch.arange(start, start + T, device=input_ids.device)
            mask = (torch.arange(start + T, device=input_ids.device)[None, :] <= q_abs[:, None])[None, None]
        for i, block in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i], start) if cache is not None else None
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, kv, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, kv)
        if cache is not None:
            cache.length = start + T
        x = self.norm(x)
        return x if return_hidden else self.lm_head(x)
