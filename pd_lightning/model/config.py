"""Student configuration: one dataclass plus a table of named presets.

The paper's students (Table 7 of arXiv 2410.16215) use GQA, SwiGLU and vocabulary 151,552 (GLM-4's tokenizer).
Their parameter counts land within 3% of their names when the head dimension is ``hidden / heads``: 128 for
1.9B, 3.8B and 6.8B, and 64 for 330M and 670M (with 128 the two small ones would have 363M and 726M).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GLM4_VOCAB = 151_552

# Presets are data: one dict per named size. ``vocab_size`` here is the paper's; at training time it is replaced
# by the tokenizer's (linked from the data module).
PRESETS: list[dict] = [
    # CPU-sized students for tests and the demo.
    dict(preset="tiny", n_embd=64, n_layer=2, n_head=4, n_query_groups=2, intermediate_size=176, vocab_size=512),
    dict(preset="demo", n_embd=128, n_layer=4, n_head=4, n_query_groups=2, intermediate_size=352, vocab_size=4096),
    # The paper's Table 7.
    dict(
        preset="330M", n_embd=1024, intermediate_size=4096, n_layer=12, n_head=16, n_query_groups=2, tie_embeddings=True
    ),
    dict(preset="670M", n_embd=1024, intermediate_size=4096, n_layer=24, n_head=16, n_query_groups=2),
    dict(preset="1.9B", n_embd=2048, intermediate_size=6912, n_layer=24, n_head=16, n_query_groups=2),
    dict(preset="3.8B", n_embd=3072, intermediate_size=8192, n_layer=28, n_head=24, n_query_groups=8),
    dict(preset="6.8B", n_embd=4096, intermediate_size=12800, n_layer=28, n_head=32, n_query_groups=8),
]
PRESET_NAMES = [p["preset"] for p in PRESETS]

# The longest input every student is declared for (the paper's students are trained at 4,096 tokens). RoPE has no
# learned positions, so a student trained on shorter sequences still runs at this length (it extrapolates).
CONTEXT_LENGTH = 4096


def declared_max_length(seq_len: int | None = None) -> int:
    """A student's maximum length, the one source of truth for every scoring path: ``export-hf`` writes it as the
    export's ``max_position_embeddings`` (which lm-eval's ``hf`` model reads), and ``StudentLM``, ``validate`` and
    ``LMEvalCallback`` score with it. It is ``CONTEXT_LENGTH`` (4,096), or the training sequence length ``seq_len``
    when that is longer. A student trained on shorter sequences is scored on the benchmarks' real prompt lengths
    (extrapolating), and the scoring says how many requests that concerns."""
    return max(CONTEXT_LENGTH, int(seq_len or 0))


# Fields a preset fills in when the user leaves them unset (None).
_SHAPE_FIELDS = ("n_embd", "n_layer", "n_head", "n_query_groups", "intermediate_size")


@dataclass
class StudentConfig:
    """Shape of the decoder-only student (Llama-style: RMSNorm, RoPE, SwiGLU, GQA).

    Attributes:
        preset: name of a preset (tiny, demo, 330M, 670M, 1.9B, 3.8B, 6.8B) that fills every field left unset.
        vocab_size: vocabulary size; linked from the data module's tokenizer when training.
        n_embd: hidden size.
        n_layer: number of transformer blocks.
        n_head: number of query heads.
        n_query_groups: number of key/value heads (grouped-query attention); must divide n_head.
        intermediate_size: SwiGLU feed-forward width.
        head_dim: per-head size; defaults to n_embd // n_head.
        tie_embeddings: share the input embedding and the output head.
        rope_base: RoPE base frequency (theta).
        norm_eps: RMSNorm epsilon.
        init_std: standard deviation of the normal weight initialisation.
    """

    preset: str | None = None
    vocab_size: int | None = None
    n_embd: int | None = None
    n_layer: int | None = None
    n_head: int | None = None
    n_query_groups: int | None = None
    intermediate_size: int | None = None
    head_dim: int | None = None
    tie_embeddings: bool | None = None
    rope_base: float = 10_000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.preset is not None:
            matches = [p for p in PRESETS if p["preset"] == self.preset]
            if not matches:
                raise ValueError(
                    f"unknown preset {self.preset!r} (--model.student.preset); choose one of {PRESET_NAMES}"
                )
            for key, value in matches[0].items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        if self.vocab_size is None:
            self.vocab_size = GLM4_VOCAB
        if self.tie_embeddings is None:
            self.tie_embeddings = False
        missing = [f for f in _SHAPE_FIELDS if getattr(self, f) is None]
        if missing:
            raise ValueError(f"student config needs {missing} or a --model.student.preset (one of {PRESET_NAMES})")
        for name in ("vocab_size", *_SHAPE_FIELDS):
            if getattr(self, name) <= 0:
                raise ValueError(f"--model.student.{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_query_groups:
            raise ValueError(
                f"--model.student.n_query_groups ({self.n_query_groups}) must divide n_head ({self.n_head})"
            )
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head}); set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise ValueError(f"--model.student.head_dim must be even for RoPE, got {self.head_dim}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> StudentConfig:
        return cls(preset=name, **overrides)

    def shape(self) -> dict:
        """The fields that determine parameter shapes (used to refuse resuming a differently shaped model)."""
        keys = ("vocab_size", *_SHAPE_FIELDS, "head_dim", "tie_embeddings")
        return {k: getattr(self, k) for k in keys}

    def asdict(self) -> dict:
        return dataclasses.asdict(self)

    def num_parameters(self) -> int:
        """Parameter count from the shapes alone (agrees with ``sum(p.numel())`` of the built model)."""
        h, q, kv = self.n_embd, self.n_head * self.head_dim, self.n_query_groups * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size
        block = attn + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.n_layer * block + embeddings + h
