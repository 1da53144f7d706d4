"""Hugging Face interop: a student <-> a ``transformers`` ``LlamaForCausalLM`` folder.

The student's layout is Llama's, so conversion is a rename of state-dict keys (no reshapes, no re-permutation of
q/k: both use the half-split rotary embedding). ``transformers`` is imported lazily.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from pd_lightning.model.config import CONTEXT_LENGTH, StudentConfig, declared_max_length
from pd_lightning.model.transformer import Transformer

# (our key pattern, HF key pattern); {i} is the layer index.
_KEYS = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
]


def _rename(key: str, src: int, dst: int) -> str | None:
    for pair in _KEYS:
        pattern = re.escape(pair[src]).replace(r"\{i\}", r"(\d+)")
        m = re.fullmatch(pattern, key)
        if m:
            return pair[dst].replace("{i}", m.group(1)) if m.groups() else pair[dst]
    return None


def to_hf_config(cfg: StudentConfig, max_position_embeddings: int = CONTEXT_LENGTH, **special_tokens):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_query_groups,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_base,
        tie_word_embeddings=cfg.tie_embeddings,
        max_position_embeddings=max_position_embeddings,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.init_std,
        **special_tokens,
    )


def from_hf_config(hf_config) -> StudentConfig:
    if getattr(hf_config, "model_type", None) != "llama":
        raise ValueError(
            f"only Llama-architecture models convert to a student, got model_type={hf_config.model_type!r}"
        )
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError("Llama models with attention/MLP biases have no student equivalent")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"RoPE scaling {rope.get('rope_type')!r} is not supported by the student")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10_000.0))
    return StudentConfig(
        vocab_size=hf_config.vocab_size,
        n_embd=hf_config.hidden_size,
        n_layer=hf_config.num_hidden_layers,
        n_head=hf_config.num_attention_heads,
        n_query_groups=hf_config.num_key_value_heads,
        intermediate_size=hf_config.intermediate_size,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        tie_embeddings=bool(hf_config.tie_word_embeddings),
        rope_base=float(theta),
        norm_eps=hf_config.rms_norm_eps,
    )


def student_to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        if model.config.tie_embeddings and key == "lm_head.weight":
            continue
        hf_key = _rename(key, 0, 1)
        if hf_key is None:
            raise KeyError(f"no Hugging Face name for student parameter {key!r}")
        out[hf_key] = value
    return out


def export_hf(
    model: Transformer,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    max_position_embeddings: int | None = None,
    trained_seq_len: int | None = None,
):
    """Write ``model`` as a ``LlamaForCausalLM`` folder (``save_pretrained``), with the tokenizer when given.

    ``max_position_embeddings`` (what lm-eval's ``hf`` model scores with) defaults to the student's declared length
    (``declared_max_length(trained_seq_len)``); ``trained_seq_len`` is also recorded as ``pd_lightning_seq_len``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    special = {}
    tokenizer = None
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        special = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        special = {k: v for k, v in special.items() if v is not None}
    if max_position_embeddings is None:
        max_position_embeddings = declared_max_length(trained_seq_len)
    hf_config = to_hf_config(model.config, max_position_embeddings, **special)
    if trained_seq_len:
        hf_config.pd_lightning_seq_len = int(trained_seq_len)
    with torch.device("meta"):
        hf_model = LlamaForCausalLM(hf_config)
    state = {k: v.detach().to(dtype) if dtype else v.detach() for k, v in student_to_hf_state_dict(model).items()}
    hf_model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        hf_model.tie_weights()
    missing = [n for n, p in hf_model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export left parameters unset: {missing[:5]}")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return hf_model


def import_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build a student from a local Llama-architecture ``transformers`` folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not Path(path, "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
    cfg = from_hf_config(AutoConfig.from_pretrained(str(path)))
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model = Transformer(cfg).to(dtype)
    state = {}
    for key, value in hf_model.state_dict().items():
        ours = _rename(key, 1, 0)
        if ours is None:
            continue  # buffers such as rotary inv_freq
        state[ours] = value
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True)
    return model
