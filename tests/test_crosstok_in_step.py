"""The in-step teacher with its own tokenizer (issue 20, item 3): with the student's tokenizer, forced through the
cross-tokenizer path, the same losses as today's in-step path; with another tokenizer, the in-step targets equal
the cross-tokenizer cache's (whose entries are checked against a by-hand reference in test_crosstok_predict.py)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pd_lightning.cli import main
from pd_lightning.corpus.prepare import TokenFile
from tests.test_crosstok_predict import other_cache, other_teacher  # noqa: F401 (fixtures)
from tests.test_online import in_step_args
from tests.test_train import small_token_file


def losses(root: Path) -> dict[int, tuple[str, str, str]]:
    with open(root / "log" / "version_0" / "metrics.csv") as f:
        return {int(r["step"]): (r["train/loss"], r["train/lm_loss"], r["train/kd_loss"])
                for r in csv.DictReader(f) if r.get("train/loss")}  # fmt: skip


def test_same_tokenizer_forced_through_the_cross_path_gives_the_same_losses(tmp_path, prepared, hf_teacher):
    """3 steps of in-step distillation from the student's own tokenizer's teacher: the logged losses (as written,
    all digits) are equal with ``--model.teacher_cross_tokenizer always`` and without (every row of this token file
    re-tokenizes to its own ids, so every position is aligned and every id maps to itself)."""
    from pd_lightning.corpus.tokenizer import load_tokenizer

    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=12, n_val=4)
    tok, tf = load_tokenizer(prepared["tokenizer"]), TokenFile(tokens)
    for i in range(12):
        row = tf.rows("train", i).tolist()
        assert tok.encode(tok.decode(row), add_special_tokens=False) == row
    teacher = ["--model.teacher", str(hf_teacher)]
    main(in_step_args(tokens, tmp_path / "plain", 3, *teacher))
    main(in_step_args(tokens, tmp_path / "cross", 3, *teacher, "--model.teacher_cross_tokenizer", "always"))
    plain, cross = losses(tmp_path / "plain"), losses(tmp_path / "cross")
    assert len(plain) == 3 and plain == cross


def test_other_tokenizer_in_step_targets_equal_the_cache(tmp_path, prepared, other_teacher, other_cache):  # noqa: F811
    """The training step's own path (``DistillationModule._online_target``) on the first 4 val sequences, with the
    teacher of another tokenizer: the same aligned positions, ids and probabilities (within the cache's -log p
    step; float16 statistics) as the cache ``predict`` wrote; and a short fit through the CLI."""
    from pd_lightning.cache.reader import TeacherCache
    from pd_lightning.corpus.datamodule import TokenDataset
    from pd_lightning.distill.processors import TopPK
    from pd_lightning.model.config import StudentConfig
    from pd_lightning.module import DistillationModule

    tf = TokenFile(prepared["tokens"])
    module = DistillationModule(StudentConfig(preset="tiny", vocab_size=tf.vocab_size), teacher=str(other_teacher),
                                teacher_processor=TopPK(1.0, 20))  # fmt: skip
    data = SimpleNamespace(tokenizer_path=tf.tokenizer_path, tokenizer_fingerprint=tf.fingerprint, tokens=tf)
    module._check_online_teacher(data)
    assert module.frozen_teacher.pair is not None
    ds = TokenDataset(tf, "val")
    batch = {k: torch.stack([ds[i][k] for i in range(4)]) for k in ("input_ids", "labels", "sequence_index")}
    target, _ = module._online_target(batch, alpha=0.5)
    cache = TeacherCache(other_cache)
    step = cache.spec.nlogp_max / 16383
    for i in range(4):
        item, rows = cache.read(i), slice(i * 64, (i + 1) * 64)
        valid = torch.isfinite(item["teacher_logprobs"])
        assert torch.equal(valid, torch.isfinite(target.logprobs[rows]))
        assert torch.equal(item["teacher_ids"][valid], target.ids[rows][valid])
        diff = (item["teacher_logprobs"][valid] - target.logprobs[rows][valid]).abs()
        assert float(diff.max()) <= step / 2 + 1e-5
        np.testing.assert_allclose(item["teacher_tail"], target.tail[rows], rtol=1e-3, atol=3e-5)
        np.testing.assert_allclose(item["teacher_entropy"], target.entropy[rows], rtol=1e-3, atol=3e-5)
    tokens = small_token_file(prepared, tmp_path / "tokens.h5", n_train=8, n_val=4)
    root = tmp_path / "fit"
    main(in_step_args(tokens, root, 2, "--model.teacher", str(other_teacher)))
    kd = [float(v[2]) for v in losses(root).values()]
    assert len(kd) == 2 and all(math.isfinite(v) and v > 0 for v in kd)
