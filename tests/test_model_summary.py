"""The model summary `pd-lightning fit` prints (Lightning's ModelSummary / RichModelSummary).

Issue 18: its FLOPs column and "Total FLOPs" were 0: Lightning counts FLOPs only while running the module's
``example_input_array``, which the DistillationModule has none of (a forward of a large student at summary time,
on every rank, under FSDP, is not something to run). They are now the FLOPs of the student's forward on one training
micro-batch (batch size x sequence length, shown as its "In sizes"), counted on a meta-device copy.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from torch.utils.flop_counter import FlopCounterMode

from pd_lightning.cli import main
from tests.test_train import small_token_file, tiny_fit_args


def forward_flops(module, shape: tuple[int, int]) -> int:
    """FLOPs of the student's forward on a real (CPU) batch of ``shape``: what the summary must show. Attention
    through SDPA's math backend, whose matmuls the counter sees (torch has no FLOP formula for the fused CPU kernel,
    so it would leave attention out; it counts it on the meta device and for the GPU kernels)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        module.model(torch.zeros(shape, dtype=torch.long))
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def tokens(prepared, tmp_path_factory) -> Path:
    return small_token_file(prepared, tmp_path_factory.mktemp("summary") / "tokens.h5", n_train=48, n_val=8)


def test_fit_prints_the_students_flops(tokens, tmp_path, capsys):
    from pd_lightning.module import DistillationModule

    args = tiny_fit_args(tokens, tmp_path, 1, "--trainer.limit_val_batches=0")
    args[args.index("--trainer.enable_model_summary") + 1] = "true"
    capsys.readouterr()
    main(args)
    out = capsys.readouterr().out
    module = DistillationModule.load_from_checkpoint(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    expected = forward_flops(module, (4, 64))  # --data.batch_size 4, sequences of 64 tokens
    assert expected > 0
    total = re.search(r"Total FLOPs: *(\S+(?: \S)?)", out)
    assert total and total.group(1).strip() == get_human_readable_count(expected), out[-2000:]
    row = next(line for line in out.splitlines() if re.search(r"│ model +│", line))
    assert get_human_readable_count(expected) in row and "[4, 64]" in row, row


@pytest.mark.parametrize("max_depth", [1, 2])
def test_summary_table_per_layer(max_depth):
    """The plain (non-Rich) table, at depth 1 and 2: the student's row and its layers' rows carry their FLOPs, the
    rows outside the forward (the metrics) 0, and the total is the student's forward."""
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.module import DistillationModule
    from pd_lightning.summary import StudentFlopsSummary

    module = DistillationModule(StudentConfig(preset="tiny", vocab_size=97), max_steps=10)
    summary = StudentFlopsSummary(module, max_depth=max_depth, batch_shape=(2, 16))
    expected = forward_flops(module, (2, 16))
    assert summary.total_flops == expected
    flops = {name: sum(c.values()) for name, c in summary.flop_counts.items()}
    assert flops["model"] == expected and flops["val_lm"] == 0
    if max_depth == 2:
        layers = [name for name in flops if name.startswith("model.")]  # embed, layers (a ModuleList), norm, head
        assert layers and sum(flops[n] for n in layers) == expected and flops["model.layers"] > 0, flops
    table = str(summary)
    assert f"{get_human_readable_count(expected)}" in table and "Total Flops" in table, table
    assert "[2, 16]" in table and "[2, 16, 97]" in table, table
