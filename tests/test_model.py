"""The student against transformers' Llama (the reference implementation) and the paper's parameter counts."""

from __future__ import annotations

import pytest
import torch

from pd_lightning.model.config import PRESETS, StudentConfig
from pd_lightning.model.hf import export_hf, import_hf
from pd_lightning.model.transformer import Transformer

PAPER = {"330M": 330e6, "670M": 670e6, "1.9B": 1.9e9, "3.8B": 3.8e9, "6.8B": 6.8e9}


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_parameter_counts_within_3_percent(name):
    cfg = StudentConfig.from_name(name)
    assert cfg.vocab_size == 151_552
    with torch.device("meta"):
        model = Transformer(cfg)
    counted = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert counted == cfg.num_parameters()
    assert abs(counted - PAPER[name]) / PAPER[name] <= 0.03, (name, counted)


def test_table7_shapes():
    # Table 7 of the paper, typed independently of the preset table.
    table = {
        "330M": (1024, 4096, 12, 16, 2, True),
        "670M": (1024, 4096, 24, 16, 2, False),
        "1.9B": (2048, 6912, 24, 16, 2, False),
        "3.8B": (3072, 8192, 28, 24, 8, False),
        "6.8B": (4096, 12800, 28, 32, 8, False),
    }
    for name, (h, ffn, layers, heads, groups, tied) in table.items():
        c = StudentConfig.from_name(name)
        assert (c.n_embd, c.intermediate_size, c.n_layer, c.n_head, c.n_query_groups, c.tie_embeddings) == (
            h,
            ffn,
            layers,
            heads,
            groups,
            tied,
        )


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_logits_match_transformers_llama(tmp_path, tie, groups):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = StudentConfig(
        vocab_size=301, n_embd=64, n_layer=3, n_head=4, n_query_groups=groups, intermediate_size=96,
        tie_embeddings=tie, rope_base=500.0,
    )  # fmt: skip
    model = Transformer(cfg).eval()
    export_hf(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 41))
    with torch.no_grad():
        ours, ref = model(x), hf(x).logits
    assert ours.shape == ref.shape == (2, 41, 301)
    assert (ours - ref).abs().max().item() <= 1e-4
    # ... and back: the imported student is the same function.
    back = import_hf(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(back(x), ours)


def test_return_hidden_then_head_equals_logits():
    torch.manual_seed(0)
    model = Transformer(StudentConfig(preset="tiny", vocab_size=97)).eval()
    x = torch.randint(0, 97, (2, 9))
    h = model(x, return_hidden=True)
    assert h.shape == (2, 9, 64)
    torch.testing.assert_close(h @ model.output_weight.T, model(x))


def test_causality():
    torch.manual_seed(0)
    model = Transformer(StudentConfig(preset="tiny", vocab_size=50)).eval()
    x = torch.randint(0, 50, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :8], model(y)[:, :8])


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        StudentConfig(preset="nope")
    with pytest.raises(ValueError, match="n_query_groups"):
        StudentConfig(preset="tiny", n_query_groups=3)
    with pytest.raises(ValueError, match="n_layer must be positive"):
        StudentConfig(preset="tiny", n_layer=0)
    with pytest.raises(ValueError, match="preset"):
        StudentConfig(n_embd=8)


def test_presets_are_unique():
    names = [p["preset"] for p in PRESETS]
    assert len(names) == len(set(names))
