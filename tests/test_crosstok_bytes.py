"""Bytes per token and bits per byte (issue 20, item 4): the byte table of real tokenizers, ``val/bpb`` of a fit
against an fp64 recomputation, and the sum over ranks before the division."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pd_lightning.crosstok.bytes import BitsPerByte, check_round_trip, target_bytes, token_bytes

ROOT = Path(__file__).resolve().parents[1]

# Real text beside the English of the fixtures: Chinese and Japanese prose, emoji (4-byte characters, a ZWJ family,
# a flag, a skin tone), accents, and the whitespace shapes byte-level pre-tokenizers treat apart.
MIXED = [
    "蒸馏是一种模型压缩方法：学生模型学习教师模型的输出分布。预训练阶段的蒸馏让小模型更快地学到语言知识。",
    "日本語の文章も含めます。東京は晴れ、気温は二十度です。",
    "Emoji: 😀 👨‍👩‍👧‍👦 🇨🇳 👍🏽 — and accents: café, naïve, Zürich.",
    "mixed 中文 and English, 数字 123，标点！？ end\n\n\tindented\r\n",
    "  leading spaces, trailing spaces   ",
]


def byte_level_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE trained here (the shape `pd-lightning prepare` writes), as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def english() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:40]]


@pytest.fixture(scope="module")
def prepared_tok(prepared):
    from pd_lightning.corpus.tokenizer import load_tokenizer

    return load_tokenizer(prepared["tokenizer"])


def test_byte_level_pieces_concatenate_to_the_text(prepared_tok):
    """The prepared tokenizer (English only, so CJK and emoji fall apart into byte tokens) and one trained on the CJK
    and emoji text (which merges their bytes, also across character boundaries): the tokens' bytes concatenate to
    the text's UTF-8 bytes, and the table's lengths sum to its length."""
    mixed_tok = byte_level_bpe(MIXED * 3 + english()[:5], 600)
    texts = english() + MIXED
    for tok in (prepared_tok, mixed_tok):
        table = token_bytes(tok)
        assert table.exact and len(table) == len(tok)
        check_round_trip(tok, table, texts)
        lengths = table.lengths()
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    # the CJK/emoji tokenizer does split characters: some of its tokens are not valid UTF-8 on their own
    table = token_bytes(mixed_tok)
    ids = mixed_tok.encode(MIXED[2], add_special_tokens=False)
    partial = [table.pieces[i] for i in ids if not _utf8(table.pieces[i])]
    assert partial, "expected a token holding part of a multi-byte character"
    table = token_bytes(prepared_tok)  # the English one: 😀 is its 4 single bytes
    assert [table.pieces[i] for i in prepared_tok.encode("😀", add_special_tokens=False)] == [
        bytes([b]) for b in "😀".encode()
    ]


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_special_tokens_count_zero_bytes_and_padding_ids_too(prepared_tok):
    table = token_bytes(prepared_tok, vocab_size=len(prepared_tok) + 3)
    eos = prepared_tok.convert_tokens_to_ids("<|endoftext|>")
    assert table.pieces[eos] == b"" and eos in table.special
    assert table.pieces[-3:] == (b"", b"", b"") and len(table) == len(prepared_tok) + 3
    with pytest.raises(ValueError, match="vocab_size 10 is smaller than the tokenizer's 512 ids"):
        token_bytes(prepared_tok, vocab_size=10)


def test_target_bytes_skips_ignored_labels():
    lengths = torch.tensor([0, 1, 3, 4])
    labels = torch.tensor([[1, 2, -100], [3, 0, 2]])
    assert int(target_bytes(labels, lengths)) == 1 + 3 + 4 + 0 + 3


def test_a_tokenizer_that_does_not_concatenate_is_named_at_its_first_bad_text():
    """A SentencePiece-style BPE (Metaspace, byte fallback): its decoder strips the leading space that the ``▁`` of
    the first word stands for, so the table is marked inexact and the round trip is refused on the first text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>", *bytes_], show_progress=False)
    tok.train_from_iterator(english()[:10], trainer=trainer)
    sp = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    table = token_bytes(sp)
    assert not table.exact
    with pytest.raises(ValueError, match=r"does not round-trip the bytes of sequence 0: .* at byte 0"):
        check_round_trip(sp, table, ["Hello world", "x"], what="sequence")


# ---- val/bpb of a fit ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokens(prepared, tmp_path_factory) -> Path:
    from tests.test_train import small_token_file

    return small_token_file(prepared, tmp_path_factory.mktemp("bpb") / "tokens.h5", n_train=104, n_val=10)


def test_val_bpb_equals_an_fp64_recomputation(tokens, prepared, prepared_tok, tmp_path, capsys):
    """10 validation sequences in batches of 4, 4, 2: ``val/bpb`` = the fp64 cross-entropy of the checkpoint's logits
    summed over every target token / ln 2 / the UTF-8 bytes of the validation text, where the bytes are counted
    independently of the table: the text ``tokenizer.decode`` gives for each sequence's targets (special tokens left
    out: they count 0 bytes; every window of this file begins and ends on a character boundary). ``pd-lightning
    validate`` of the checkpoint prints the same number."""
    from pd_lightning.cli import main
    from pd_lightning.corpus.prepare import TokenFile
    from pd_lightning.module import DistillationModule
    from tests.test_train import tiny_fit_args

    main(tiny_fit_args(tokens, tmp_path, 6, "--data.init_args.val_sequences=10", "--trainer.val_check_interval=6",
                       "--trainer.check_val_every_n_epoch=null"))  # fmt: skip
    with open(tmp_path / "log" / "version_0" / "metrics.csv") as f:
        logged = [(float(r["val/loss"]), float(r["val/bpb"])) for r in csv.DictReader(f) if r.get("val/bpb")]
    assert len(logged) == 1
    assert "val/bpb" in capsys.readouterr().out
    ckpt = next(tmp_path.rglob("*.ckpt"))
    module = DistillationModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).double().eval()
    data = torch.from_numpy(TokenFile(tokens).rows("val", slice(0, 10)).astype("int64"))
    with torch.no_grad():
        logits = module(data[:, :-1])  # (10, 64, V) fp64
        nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten(), reduction="sum")
    texts = [prepared_tok.decode(row[1:].tolist(), skip_special_tokens=True) for row in data]
    assert not any("\ufffd" in t for t in texts)  # whole characters: the decoded text's bytes are the targets' bytes
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert num_bytes > data[:, 1:].numel()  # more than a byte per token: the table is not a token count
    expected = float(nats) / math.log(2) / num_bytes
    val_loss, val_bpb = logged[0]
    assert val_bpb == pytest.approx(expected, rel=1e-5)
    assert val_loss == pytest.approx(float(nats) / data[:, 1:].numel(), rel=1e-5)
    # `pd-lightning validate` of the checkpoint prints the same number
    args = tiny_fit_args(tokens, tmp_path / "v", 1, "--data.init_args.val_sequences=10", "--ckpt_path", str(ckpt))
    main(["validate", *args[1:]])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("validate  val/loss"))
    assert float(line.split("val/bpb")[1]) == pytest.approx(expected, rel=1e-4)


def test_bits_per_byte_sums_over_ranks_before_dividing(tmp_path):
    """2 gloo ranks with different nats and bytes: every rank computes the ratio of the totals, 11 nats / ln 2 /
    10 bytes -- not the mean of the ranks' ratios ((10 / 1 + 1 / 9) / 2 / ln 2)."""
    out = tmp_path / "out.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*cmd, str(ROOT / "tests/workers/bits_per_byte.py"), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    values = torch.load(out, weights_only=True)
    expected = 11.0 / math.log(2) / 10.0
    assert values.tolist() == pytest.approx([expected, expected], rel=1e-6)
    one = BitsPerByte()  # the same updates in one process: the same number
    for nats, n in [(6.0, 1), (4.0, 0), (1.0, 5), (0.0, 4)]:
        one.update(torch.tensor(nats), torch.tensor(n))
    assert float(one.compute()) == pytest.approx(expected, rel=1e-6)
