"""Shared pieces of the evaluation tests: offline Hugging Face caches in a temp folder, the fixture data folder,
a tiny student over the test tokenizer, a trained checkpoint, and lm-eval ``Instance`` builders."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# Offline, and lm-eval's dataset cache kept out of the user's home (set before `datasets` is imported).
_HF_TMP = tempfile.mkdtemp(prefix="pd_lightning_test_hf_")
atexit.register(shutil.rmtree, _HF_TMP, True)
os.environ["HF_HOME"] = _HF_TMP
os.environ["HF_DATASETS_CACHE"] = os.path.join(_HF_TMP, "datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
ALL_TASKS = ("hellaswag", "winogrande", "piqa", "mmlu", "c3", "ceval", "gsm8k")


def tiny_student(vocab_size: int, seed: int = 0):
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.model.transformer import Transformer

    torch.manual_seed(seed)
    cfg = StudentConfig(preset="tiny", vocab_size=vocab_size)
    return Transformer(cfg).eval()


def instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def eval_ckpt(tmp_path_factory, prepared) -> Path:
    """A tiny student trained 3 steps through `pd-lightning fit` on the prepared token file."""
    from pd_lightning.cli import main
    from tests.test_train import tiny_fit_args

    root = tmp_path_factory.mktemp("eval_run")
    main(tiny_fit_args(prepared["tokens"], root, 3))
    (ckpt,) = root.rglob("*.ckpt")
    return ckpt
