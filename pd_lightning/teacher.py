"""Teachers: loading one (a local Hugging Face causal LM or a pd-lightning checkpoint) and its identity.

``load_teacher`` returns a ``Teacher``: a module mapping input ids (B, T) to logits (B, T, V), with the
fingerprints a logits cache records. ``trust_remote_code`` is used only when the caller sets it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Teacher:
    model: nn.Module
    vocab_size: int
    fingerprint: str
    tokenizer_fingerprint: str | None
    tokenizer_path: str | None = None  # recorded by pd-lightning checkpoints (the token file's tokenizer folder)
    seq_len: int | None = None  # the training sequence length a pd-lightning checkpoint records

    def __call__(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)


class _HFLogits(nn.Module):
    """Wraps a ``transformers`` causal LM so that calling it returns the logits tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def _file_fingerprint(paths: list[Path], extra: bytes = b"") -> str:
    """sha256 over each file's size and its first and last MiB (cheap for multi-GB weights, changes with them)."""
    digest = hashlib.sha256(extra)
    for p in sorted(paths):
        size = p.stat().st_size
        digest.update(f"{p.name}:{size}".encode())
        with p.open("rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                digest.update(f.read())
    return digest.hexdigest()[:16]


def _load_hf(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> Teacher:
    from transformers import AutoConfig, AutoModelForCausalLM

    from pd_lightning.corpus.tokenizer import load_tokenizer, tokenizer_fingerprint

    try:
        auto_map = json.loads((path / "config.json").read_text(encoding="utf-8")).get("auto_map")
    except (OSError, ValueError, AttributeError):
        auto_map = None  # AutoConfig says what is wrong with the file
    if auto_map and not trust_remote_code:  # transformers' own message points at a made-up hub link
        code = ", ".join(sorted({str(v if isinstance(v, str) else v[0]) for v in auto_map.values()}))
        raise ValueError(
            f"--model.teacher {str(path)!r}: its model is defined by code shipped in the folder (config.json "
            f"auto_map: {code}), which runs only with --model.trust_remote_code true; set it only if you trust "
            "the folder's source"
        )
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--model.teacher {str(path)!r}: not a Hugging Face model folder ({first})") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ValueError(f"--model.teacher {str(path)!r}: not a causal language model ({e})") from None
    weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    fingerprint = _file_fingerprint(weights, json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    tok_fp = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tok_fp = tokenizer_fingerprint(load_tokenizer(path, flag="--model.teacher"))
    vocab = model.get_output_embeddings().weight.shape[0]
    return Teacher(_HFLogits(model).eval(), vocab, fingerprint, tok_fp)


def _load_checkpoint(path: Path, dtype: torch.dtype, flag: str) -> Teacher:
    from pd_lightning.checkpoint_io import load_checkpoint
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.model.transformer import Transformer

    ckpt = load_checkpoint(path, flag, kind="student")  # weights_only=True; one-line errors
    where = f"{flag} {str(path)!r}"
    try:
        cfg = StudentConfig(**ckpt["hyper_parameters"]["student"])
        model = Transformer(cfg)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: its student hyperparameters do not build a student ({e})") from None
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise ValueError(f"{where}: its weights do not fit its student config ({first[:200]})") from None
    extra = ckpt.get("pd_lightning", {})
    return Teacher(
        model.to(dtype).eval(),
        cfg.vocab_size,
        _file_fingerprint([path]),
        extra.get("tokenizer_fingerprint"),
        extra.get("tokenizer_path"),
        int(extra["seq_len"]) if extra.get("seq_len") else None,
    )


def load_teacher(
    path: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False, flag: str = "--model.teacher"
) -> Teacher:
    """Load a teacher from a local HF causal-LM folder or a pd-lightning ``.ckpt`` file.

    Args:
        path: the folder (config.json + weights) or checkpoint file.
        dtype: float32, bfloat16 or float16.
        trust_remote_code: allow the folder's own modelling code (only when you trust its source).
        flag: the command-line flag named in error messages.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--model.dtype must be one of {list(DTYPES)}, got {dtype!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{flag}: {str(p)!r} does not exist")
    if p.is_file():
        return _load_checkpoint(p, DTYPES[dtype], flag)
    if (p / "meta.pt").is_file():
        raise ValueError(
            f"{flag} {str(p)!r} is a sharded (FSDP) checkpoint folder: consolidate it into one file first "
            f"(python -m lightning.pytorch.utilities.consolidate_checkpoint {str(p)})"
        )
    if not (p / "config.json").is_file():
        raise ValueError(f"--model.teacher {str(p)!r}: not a Hugging Face model folder (no config.json)")
    return _load_hf(p, DTYPES[dtype], trust_remote_code)
