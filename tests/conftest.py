"""Shared fixtures: real text, a locally trained tokenizer, a prepared token file, a tiny HF Llama teacher.

Everything is built in temp folders: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported at collection: its log handler must never bind to a capsys stream)
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Real English text as .txt / .jsonl files (Python's language-reference topics)."""
    d = tmp_path_factory.mktemp("corpus")
    docs = _topics()
    half = len(docs) // 2
    (d / "a.txt").write_text("\n\n".join(docs[:20]), encoding="utf-8")
    with (d / "b.jsonl").open("w", encoding="utf-8") as f:
        for text in docs[20:half]:
            f.write(json.dumps({"text": text, "id": 1}) + "\n")
    with (d / "c.jsonl").open("w", encoding="utf-8") as f:
        for text in docs[half:]:
            f.write(json.dumps({"text": text}) + "\n")
    return d


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_dir) -> dict:
    """A token file (seq_len 64) and the BPE tokenizer (vocab 512) trained on the corpus by `prepare`."""
    from pd_lightning.corpus.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "tokens.h5"
    summary = prepare(
        input=[str(corpus_dir / "a.txt"), str(corpus_dir / "b.jsonl"), str(corpus_dir / "c.jsonl")],
        output=str(out),
        seq_len=64,
        vocab_size=512,
        val_fraction=0.05,
    )
    return {"tokens": out, "tokenizer": out.parent / "tokenizer", "summary": summary}


@pytest.fixture(scope="session")
def hf_teacher(tmp_path_factory, prepared) -> Path:
    """A tiny randomly initialised LlamaForCausalLM + the prepared tokenizer, saved as a local HF folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(prepared["tokenizer"]))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    d = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return d
