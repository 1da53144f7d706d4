"""Alignment of two tokenizations and targets over the student's vocabulary (issue 20, items 1-2), on tokenizers
trained here: the prepared 512-entry BPE (English), a 600-entry BPE trained on CJK text and emoji as well, and a
byte-level tokenizer with no merges. Every check is against a brute-force reference or a hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from pd_lightning.crosstok.align import align
from pd_lightning.crosstok.bytes import token_bytes
from pd_lightning.crosstok.vocab_map import (
    build_vocab_map,
    map_target,
    special_pairs_by_content,
    student_targets,
)
from pd_lightning.distill.target import SparseTarget
from tests.test_crosstok_bytes import MIXED, byte_level_bpe, english


@pytest.fixture(scope="module")
def toks(prepared):
    from pd_lightning.corpus.tokenizer import load_tokenizer

    student = load_tokenizer(prepared["tokenizer"])
    return {
        "student": student,  # 512 entries, English merges: CJK and emoji are single bytes
        "cjk": byte_level_bpe(MIXED * 3 + english()[:5], 600),  # merges CJK and emoji bytes, also across characters
        "bytes": byte_level_bpe(["x"], 257),  # 256 bytes + <|endoftext|>, no merge
    }


def docs_row(tok, texts: list[str]) -> list[int]:
    """Whole documents, each followed by <|endoftext|> (as `prepare` writes the stream)."""
    row = []
    for text in texts:
        row += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    return row


def brute_force_positions(row, s_bytes, teacher_ids, t_bytes) -> list[int]:
    """Reference: student position i is aligned with teacher position j when the bytes of student tokens 0..i equal
    the bytes of teacher tokens 0..j and both are non-empty (checked by comparing the byte strings themselves);
    the largest such j (the teacher's prefix that has consumed the same bytes and no more tokens)."""
    out = []
    prefixes = {}
    for j in range(len(teacher_ids)):
        prefixes.setdefault(t_bytes.join(teacher_ids[: j + 1]), []).append(j)
    for i in range(len(row)):
        b = s_bytes.join(row[: i + 1])
        out.append(prefixes[b][-1] if b and b in prefixes else -1)
    return out


def test_same_tokenizer_aligns_every_position_and_maps_targets_unchanged(toks):
    """Exactness: teacher tokenizer = student tokenizer, whole documents with <|endoftext|> between them: the teacher
    runs over the student's own ids, every position is aligned to itself, every id maps to itself, and a target
    (ties, padding, a tail) comes out bit for bit equal."""
    tok = toks["student"]
    b = token_bytes(tok)
    eos = tok.eos_token_id
    row = docs_row(tok, english()[:3] + MIXED)
    a = align(row, b, tok, b, separators={eos: eos})
    assert a.teacher_ids == row and a.aligned_fraction == 1.0
    assert a.teacher_position.tolist() == list(range(len(row)))
    vmap = build_vocab_map(b, b, special_pairs_by_content(tok, tok))
    assert torch.equal(vmap.exact, torch.arange(len(tok)))
    g = torch.Generator().manual_seed(0)
    n, k = len(row), 8
    logits = torch.randn(n, len(tok), generator=g)
    logits[:, 5] = logits[:, 6]  # exact ties
    lp, ids = torch.log_softmax(logits, -1).topk(k)
    lp[::7, 5:] = float("-inf")  # padding
    ids[::7, 5:] = 0
    target = SparseTarget(ids, lp, std=torch.rand(n), entropy=torch.rand(n), tail=1 - lp.exp().sum(-1),
                          power_sums={0.5: torch.rand(n)})  # fmt: skip
    out = student_targets(target, a, vmap)
    for field in ("ids", "logprobs", "std", "entropy", "tail"):
        assert torch.equal(getattr(out.target, field), getattr(target, field)), field
    assert torch.equal(out.target.power_sums[0.5], target.power_sums[0.5])
    assert torch.all(out.matched == 1.0)


def test_same_tokenizer_on_token_file_windows(toks, prepared):
    """Rows of the prepared token file are windows of the stream, cut anywhere: re-tokenizing a window's text gives
    the student's ids except where the cut changes the tokenization of the last word. Measured on 300 rows: at most
    one position per row, and only in the row's last two tokens."""
    from pd_lightning.corpus.prepare import TokenFile

    tok = toks["student"]
    b = token_bytes(tok)
    eos = tok.eos_token_id
    tf = TokenFile(prepared["tokens"])
    unaligned = []
    for i in range(300):
        row = tf.rows("train", i).tolist()
        a = align(row, b, tok, b, separators={eos: eos}, name=f"train row {i}")
        unaligned += [(i, p) for p in (~a.aligned).nonzero().flatten().tolist()]
    rows = [i for i, _ in unaligned]
    assert len(rows) == len(set(rows)) and all(p >= len(row) - 2 for _, p in unaligned), unaligned
    assert len(unaligned) <= 3


@pytest.mark.parametrize("pair", [("student", "cjk"), ("cjk", "student"), ("bytes", "cjk"), ("cjk", "bytes")])
def test_alignment_equals_brute_force_on_cjk_and_emoji(toks, pair):
    """Different tokenizers on English, Chinese, Japanese and emoji text: the aligned positions and their teacher
    positions equal the brute-force reference; positions inside a multi-byte character are aligned only where the
    teacher splits the character there too."""
    s_tok, t_tok = toks[pair[0]], toks[pair[1]]
    sb, tb = token_bytes(s_tok), token_bytes(t_tok)
    row = docs_row(s_tok, MIXED + english()[:1])
    a = align(row, sb, t_tok, tb, separators={s_tok.eos_token_id: t_tok.eos_token_id})
    # the reference works on the text alone: count the separators in the teacher's bytes as one marker byte each
    marker = b"\x00"
    sb_ref = type(sb)(
        tuple(marker if i == s_tok.eos_token_id else p for i, p in enumerate(sb.pieces)), True, sb.special
    )
    tb_ref = type(tb)(
        tuple(marker if i == t_tok.eos_token_id else p for i, p in enumerate(tb.pieces)), True, tb.special
    )
    assert a.teacher_position.tolist() == brute_force_positions(row, sb_ref, a.teacher_ids, tb_ref)
    text = "".join(MIXED + english()[:1]).encode()  # the row's bytes (<|endoftext|> has none)
    inside = [i for i, e in enumerate(a.student_ends) if 0 < e < len(text) and text[e] & 0xC0 == 0x80]
    if pair[0] == "bytes":  # stops inside every multi-byte character: the teacher keeps some whole, splits others
        assert any(not a.aligned[i] for i in inside) and any(a.aligned[i] for i in inside)
    assert 0.3 < a.aligned_fraction <= 1.0


def test_byte_teacher_aligns_every_student_position(toks):
    """A teacher with no merges ends a token at every byte, so every student position of a text is aligned, to the
    teacher position of its last byte (hand computation: byte offset - 1, plus one per separator before it)."""
    s_tok = toks["student"]
    sb, tb = token_bytes(s_tok), token_bytes(toks["bytes"])
    row = docs_row(s_tok, ["你好, 😀 world", "café"])
    eos_s, eos_t = s_tok.eos_token_id, toks["bytes"].eos_token_id
    a = align(row, sb, toks["bytes"], tb, separators={eos_s: eos_t})
    assert a.aligned_fraction == 1.0
    seps = 0
    for i, tid in enumerate(row):
        seps += tid == eos_s
        assert a.teacher_position[i] == a.student_ends[i] - 1 + seps


def test_unaligned_around_unmapped_separators_and_cut_characters(toks):
    """Without a separator mapping the positions that predict and follow <|endoftext|> are unaligned; a window that
    starts and ends inside a character leaves the cut bytes to nobody."""
    s_tok = toks["bytes"]
    sb = token_bytes(s_tok)
    tok = toks["cjk"]
    tb = token_bytes(tok)
    row = docs_row(s_tok, ["好的", "世界"])  # 6 bytes, eos, 6 bytes, eos
    a = align(row, sb, tok, tb)  # no separators
    assert not a.aligned[5] and not a.aligned[6]  # predicts eos / consumed eos
    assert a.teacher_ids == tok.encode("好的", add_special_tokens=False) + tok.encode("世界", add_special_tokens=False)
    cut = s_tok.encode("好的世界", add_special_tokens=False)[1:-1]  # starts 2 bytes into 好, ends 2 bytes into 界
    a = align(cut, sb, tok, tb)
    assert a.aligned[:2].sum() == 0 and a.aligned[-2:].sum() == 0
    assert tb.join(a.teacher_ids) == "的世".encode()


def test_bad_input_is_named(toks):
    s_tok = toks["bytes"]
    sb = token_bytes(s_tok)
    tb = token_bytes(toks["cjk"])
    bad = s_tok.encode("好", add_special_tokens=False)
    row = s_tok.encode("ab", add_special_tokens=False) + bad[1:] + s_tok.encode("cd", add_special_tokens=False)
    with pytest.raises(ValueError, match=r"align: row 7: the student tokens' bytes are not UTF-8 text at byte 2"):
        align(row, sb, toks["cjk"], tb, name="row 7")
    # a SentencePiece-style teacher (its decoder drops the first ▁'s space): refused, naming the row and the byte
    sp = _metaspace_tokenizer()
    with pytest.raises(
        ValueError, match=r"align: row 3: the teacher tokenizer does not round-trip the bytes at byte 0"
    ):
        align(s_tok.encode("Hello world", add_special_tokens=False), sb, sp, token_bytes(sp), name="row 3")


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    specials = ["<unk>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(english()[:10], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def naive_map(target: SparseTarget, t_pieces, s_pieces, rule: str, pairs: dict[int, int]):
    """Reference in plain Python, fp64: per row, {student id: probability} and the unmatched mass; special tokens
    (no bytes) by ``pairs`` only."""
    by_bytes = {}
    for i, p in enumerate(s_pieces):
        if p and p not in by_bytes:
            by_bytes[p] = i
    rows = []
    for ids, lps in zip(target.ids.tolist(), target.logprobs.double().tolist()):
        acc, lost, mapped = {}, 0.0, 0
        for t, lp in zip(ids, lps):
            if not math.isfinite(lp):
                continue
            piece = t_pieces[t]
            s = by_bytes.get(piece) if piece else pairs.get(t)
            if s is None and rule == "prefix" and piece:
                s = next((by_bytes[piece[:c]] for c in range(len(piece) - 1, 0, -1) if piece[:c] in by_bytes), None)
            if s is None:
                lost += math.exp(lp)
            else:
                acc[s] = acc.get(s, 0.0) + math.exp(lp)
                mapped += 1
        rows.append((acc, lost, mapped))
    return rows


@pytest.mark.parametrize("rule", ["tail", "prefix"])
def test_map_target_against_a_naive_reference(toks, rule):
    """Teacher = the CJK tokenizer, student = the English one: teacher tokens such as 你好 have no student match.
    ``tail``: their mass joins the tail; ``prefix``: it goes to the longest student prefix, where several teacher
    tokens meet and add up. Entries sorted by probability, descending; matched share = exact-match mass / kept."""
    t_tok, s_tok = toks["cjk"], toks["student"]
    tb, sb = token_bytes(t_tok), token_bytes(s_tok)
    pairs = special_pairs_by_content(t_tok, s_tok)
    assert pairs == {t_tok.eos_token_id: s_tok.eos_token_id}
    vmap = build_vocab_map(tb, sb, pairs)
    assert 0.3 < vmap.matched_ids < 1.0
    g = torch.Generator().manual_seed(1)
    n, k = 40, 12
    lp, ids = torch.log_softmax(torch.randn(n, len(t_tok), generator=g) * 3, -1).topk(k)
    lp[::5, 9:] = float("-inf")
    ids[::5, 9:] = 0
    tail = 1 - lp.double().exp().sum(-1)
    target = SparseTarget(ids, lp, tail=tail.float())
    out = map_target(target, vmap, rule)
    ref = naive_map(target, tb.pieces, sb.pieces, rule, pairs)
    merged_somewhere = False
    for r, (acc, lost, mapped) in enumerate(ref):
        valid = torch.isfinite(out.target.logprobs[r])
        got = dict(zip(out.target.ids[r][valid].tolist(), out.target.logprobs[r][valid].double().exp().tolist()))
        assert got.keys() == acc.keys()
        for s, pr in acc.items():
            assert got[s] == pytest.approx(pr, rel=1e-6)
        probs = out.target.logprobs[r][valid]
        assert torch.all(probs[:-1] >= probs[1:])  # descending
        assert float(out.target.tail[r]) == pytest.approx(float(tail[r]) + lost, abs=1e-6)
        merged_somewhere |= len(acc) < mapped  # several teacher entries added into one student entry
        kept = float(target.logprobs[r].double().exp().sum())
        exact = sum(
            math.exp(lp_) for t, lp_ in zip(ids[r].tolist(), target.logprobs[r].double().tolist())
            if math.isfinite(lp_) and int(vmap.exact[t]) >= 0
        )  # fmt: skip
        assert float(out.matched[r]) == pytest.approx(exact / kept, rel=1e-5)
    if rule == "prefix":
        assert merged_somewhere and float(out.prefixed.sum()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_map_target_without_merges_equals_the_merging_path(toks, dtype):
    """Rows where no two entries map to one student id take a shortcut (one stable sort by probability); it gives
    the general path's result bit for bit: the same rows mapped beside a row with a duplicate id (which sends the
    whole batch down the general, merging path), with ties, unmatched entries, padding and a p = 1 row."""
    t_tok, s_tok = toks["cjk"], toks["student"]
    vmap = build_vocab_map(token_bytes(t_tok), token_bytes(s_tok), special_pairs_by_content(t_tok, s_tok))
    g = torch.Generator().manual_seed(3)
    n, k = 30, 16
    lp, ids = torch.log_softmax((torch.randn(n, len(t_tok), generator=g) * 3).round(), -1).topk(k)  # ties
    lp[::4, 11:], ids[::4, 11:] = float("-inf"), 0
    lp[1], ids[1] = float("-inf"), 0
    lp[1, 0], ids[1, 0] = 0.0, int(vmap.exact.argmax())  # p = 1
    lp = lp.to(dtype)
    dup_ids, dup_lp = ids[:1].clone(), lp[:1].clone()
    dup_ids[0, :2] = int(vmap.exact.argmax())  # a matched teacher id twice: its entries merge
    for tail in (None, (1 - lp.double().exp().sum(-1)).clamp(min=0).to(dtype)):
        alone = map_target(SparseTarget(ids, lp, tail=tail), vmap, "tail")
        both_tail = None if tail is None else torch.cat([tail, tail[:1]])
        both = map_target(SparseTarget(torch.cat([ids, dup_ids]), torch.cat([lp, dup_lp]), tail=both_tail), vmap)
        assert torch.equal(alone.target.ids, both.target.ids[:n])
        as_int = torch.int16 if dtype == torch.bfloat16 else torch.int32  # bit for bit, the sign of 0 included
        assert torch.equal(alone.target.logprobs.view(as_int), both.target.logprobs[:n].view(as_int))
        assert torch.equal(alone.target.tail, both.target.tail[:n])
        assert torch.equal(alone.matched, both.matched[:n]) and torch.equal(alone.prefixed, both.prefixed[:n])
        matched_entries = int((torch.isfinite(dup_lp[0]) & (vmap.exact[dup_ids[0]] >= 0)).sum())
        assert int(torch.isfinite(both.target.logprobs[n]).sum()) < matched_entries  # the duplicate merged


def test_prefix_rule_hand_computed(toks):
    """Hand case: a teacher token of Chinese text (no student match; the English student has only the single bytes of
    Chinese characters) -> the student's token of its first byte (the longest student prefix of its bytes); ' the'
    matched exactly; the special token paired by its text."""
    t_tok, s_tok = toks["cjk"], toks["student"]
    tb, sb = token_bytes(t_tok), token_bytes(s_tok)
    vmap = build_vocab_map(tb, sb, special_pairs_by_content(t_tok, s_tok))
    nihao = [i for i, p in enumerate(tb.pieces) if len(p) >= 6 and _utf8(p) and "\u4e00" <= p.decode()[0] <= "\u9fff"]
    assert nihao, "the CJK tokenizer merged no two Chinese characters"
    piece = tb.pieces[nihao[0]]
    assert piece[:2] not in sb.pieces and piece[:1] in sb.pieces  # by hand: its longest student prefix is 1 byte
    the = [i for i, p in enumerate(tb.pieces) if p == b" the"][0]
    e4 = sb.pieces.index(piece[:1])
    assert int(vmap.exact[nihao[0]]) == -1 and int(vmap.prefix[nihao[0]]) == e4
    assert sb.pieces[int(vmap.exact[the])] == b" the"
    assert int(vmap.exact[t_tok.eos_token_id]) == s_tok.eos_token_id
    lp = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.1)]])
    target = SparseTarget(torch.tensor([[nihao[0], the, t_tok.eos_token_id]]), lp, tail=torch.tensor([0.1]))
    tail_out = map_target(target, vmap, "tail")
    assert tail_out.target.ids[0, :2].tolist() == [sb.pieces.index(b" the"), s_tok.eos_token_id]
    assert float(tail_out.target.tail[0]) == pytest.approx(0.6)
    assert float(tail_out.matched[0]) == pytest.approx(0.4 / 0.9)
    pre = map_target(target, vmap, "prefix")
    assert pre.target.ids[0].tolist() == [e4, sb.pieces.index(b" the"), s_tok.eos_token_id]
    assert float(pre.target.tail[0]) == pytest.approx(0.1) and float(pre.prefixed[0]) == pytest.approx(0.5 / 0.9)


def test_unaligned_positions_are_not_counted_by_the_loss(toks):
    """student_targets: unaligned positions get empty rows, which ``DistillLoss.counted`` leaves out of the mean."""
    from pd_lightning.distill.losses import KLD

    s_tok, t_tok = toks["bytes"], toks["cjk"]
    sb, tb = token_bytes(s_tok), token_bytes(t_tok)
    row = s_tok.encode("你好 world", add_special_tokens=False)
    a = align(row, sb, t_tok, tb)
    assert 0 < a.aligned_fraction < 1
    m = len(a.teacher_ids)
    g = torch.Generator().manual_seed(2)
    lp, ids = torch.log_softmax(torch.randn(m, len(t_tok), generator=g), -1).topk(5)
    out = student_targets(SparseTarget(ids, lp), a, build_vocab_map(tb, sb), "prefix")
    counted = KLD.counted(out.target)
    assert torch.equal(counted, a.aligned)
    assert torch.isnan(out.matched[~a.aligned]).all() and not torch.isnan(out.matched[a.aligned]).any()
