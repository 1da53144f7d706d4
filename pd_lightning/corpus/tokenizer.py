"""Tokenizers: load a local Hugging Face tokenizer folder, train a byte-level BPE, fingerprint one."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

EOS_TOKEN = "<|endoftext|>"


def load_tokenizer(path: str | os.PathLike, flag: str = "--tokenizer"):
    """A ``PreTrainedTokenizerFast`` from a local folder; a clear error when the folder is missing or not one."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{flag}: tokenizer folder {str(p)!r} does not exist")
    if not any((p / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise FileNotFoundError(f"{flag}: {str(p)!r} holds no tokenizer (no tokenizer.json / tokenizer_config.json)")
    tok = AutoTokenizer.from_pretrained(str(p))
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{flag}: {str(p)!r} is a slow tokenizer; a fast (Rust) tokenizer is required")
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE on ``texts`` and save it as a Hugging Face tokenizer folder (EOS = ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257:
        raise ValueError(f"--vocab_size must be at least 257 for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    fast.save_pretrained(str(out_dir))
    return fast


def tokenizer_fingerprint(tok) -> str:
    """sha256 of the tokenizer's model (vocabulary + merges), normaliser and pre-tokeniser: two tokenizers with the
    same fingerprint turn every text into the same ids."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    keep = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    blob = json.dumps(keep, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def vocab_size_of(tok) -> int:
    """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
    return len(tok)
