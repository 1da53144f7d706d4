"""`pd-lightning predict` with a teacher that has its own tokenizer (issue 20, item 3): exactness against the
ordinary path, the cache's entries against a reference computed here by hand, 2 ranks equal to 1, the cache-info
figures, and the refusals (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pd_lightning.cache.format import content_checksum
from pd_lightning.cache.reader import TeacherCache
from pd_lightning.cli import main
from pd_lightning.corpus.prepare import TokenFile
from tests.test_crosstok_bytes import byte_level_bpe, english

ROOT = Path(__file__).resolve().parents[1]
K = 20


def predict_args(teacher: Path, tokens: Path, out: Path, *extra: str) -> list[str]:
    return [
        "predict",
        "--model.teacher", str(teacher),
        "--model.processor", "pd_lightning.distill.processors.TopPK",
        "--model.processor.p", "1.0",
        "--model.processor.k", str(K),
        "--data.path", str(tokens),
        "--data.split", "val",
        "--data.batch_size", "4",
        "--writer.output", str(out),
        "--writer.shard_tokens", "1024",  # 16 sequences of 64 positions per shard
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "1",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def tiny_llama(tok, folder: Path, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM over ``tok``'s vocabulary, saved with the tokenizer as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    # Sharper than a random init's near-uniform distribution, so top-20 and the mapping see varied mass.
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory) -> Path:
    """A teacher with its own 800-entry byte-level BPE (trained on part of the corpus: other merges, other ids)."""
    tok = byte_level_bpe(english(), 800)
    return tiny_llama(tok, tmp_path_factory.mktemp("other_teacher"))


@pytest.fixture(scope="module")
def other_cache(tmp_path_factory, other_teacher, prepared) -> Path:
    out = tmp_path_factory.mktemp("xcache") / "cache"
    main(predict_args(other_teacher, prepared["tokens"], out))
    return out


def entries(folder: Path) -> dict[str, np.ndarray]:
    """Every stored value of a cache, decoded (ids and log-probs padded to K), by sequence."""
    cache = TeacherCache(folder)
    rows = [cache.read(i) for i in range(cache.num_sequences)]
    return {key: np.stack([r[key].numpy() for r in rows]) for key in rows[0]}


# ------------------------------------------------------------------------------------------------- exactness
def test_same_tokenizer_forced_through_the_cross_path_writes_the_same_entries(tmp_path, hf_teacher, prepared):
    """The teacher's tokenizer equals the student's, the cross-tokenizer path is forced (``--model.cross_tokenizer
    always``): every id maps to itself and every aligned position's entries and statistics equal the ordinary
    path's, bit for bit. The only positions that differ are unaligned (empty), and only in rows whose text does not
    re-tokenize to the row's own ids (a window cut inside a word: the last position of one row of the 415 here);
    which is why ``auto`` keeps the ordinary path for equal tokenizers."""
    from pd_lightning.corpus.tokenizer import load_tokenizer

    plain, cross = tmp_path / "plain", tmp_path / "cross"
    main(predict_args(hf_teacher, prepared["tokens"], plain))
    main(predict_args(hf_teacher, prepared["tokens"], cross, "--model.cross_tokenizer", "always"))
    spec = TeacherCache(cross).spec
    assert spec.cross_tokenizer and spec.vocab_map_rule == "tail"
    assert spec.teacher_tokenizer_fingerprint == spec.tokenizer_fingerprint
    assert not TeacherCache(plain).spec.cross_tokenizer
    with h5py.File(next(plain.glob("shard-*.h5"))) as f, h5py.File(next(cross.glob("shard-*.h5"))) as g:
        assert "teacher_tokenizer_fingerprint" not in f.attrs and g.attrs["vocab_map_rule"] == "tail"
    a, b = entries(plain), entries(cross)
    assert a.keys() == b.keys()
    differ = np.zeros(a["input_ids"].shape, dtype=bool)  # (N, L)
    for key in a:
        differ |= (a[key] != b[key]).reshape(*differ.shape, -1).any(-1)
    empty = ~np.isfinite(b["teacher_logprobs"]).any(-1) & (b["teacher_tail"] == 0)  # unaligned in the cross cache
    assert np.array_equal(differ, empty)
    assert 0 < differ.sum() <= 2 and differ.mean() < 1e-4
    tok = load_tokenizer(prepared["tokenizer"])
    tf = TokenFile(prepared["tokens"])
    for n in np.flatnonzero(differ.any(1)):  # those rows' text re-tokenizes to other ids
        row = tf.rows("val", int(n)).tolist()
        assert tok.encode(tok.decode(row), add_special_tokens=False) != row


# ------------------------------------------------------------------------------------------------- reference
_BYTE_CHARS = None


def gpt2_bytes(piece: str) -> bytes:
    """GPT-2's byte-level alphabet, inverted (``bytes_to_unicode`` of GPT-2's encoder.py, written out here)."""
    global _BYTE_CHARS
    if _BYTE_CHARS is None:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_CHARS = {chr(c): b for b, c in zip(bs, cs)}
    return bytes(_BYTE_CHARS[c] for c in piece)


def vocab_bytes(tok) -> list[bytes]:
    special = set(tok.all_special_ids)
    return [b"" if i in special else gpt2_bytes(tok.convert_ids_to_tokens(i)) for i in range(len(tok))]


def reference_sequence(row: list[int], s_tok, t_tok, model) -> dict[int, dict[int, float]]:
    """By hand, for one student row: the row's text split at <|endoftext|> into documents, each tokenized by the
    teacher and joined with the teacher's own <|endoftext|> (the cut characters at the row's two ends dropped);
    the teacher run over all of it; student position ``i`` aligned with the teacher position ``j`` whose prefix
    spells exactly the same bytes as student tokens ``0..i`` (byte strings compared, end-of-text as a marker that is
    not UTF-8); there the teacher's top-20 (fp64 softmax) mapped to the student id with the same bytes (the teacher's
    end-of-text to the student's), probabilities summed. Returns ``{position: {student id: probability}}``."""
    s_pieces, t_pieces = vocab_bytes(s_tok), vocab_bytes(t_tok)
    s_eos, t_eos = s_tok.eos_token_id, t_tok.eos_token_id
    eos = b"\xff<eos>"
    docs, cur = [], []
    for i in row:
        if i == s_eos:
            docs.append(cur)
            cur = []
        else:
            cur.append(i)
    docs.append(cur)
    lead = 0
    t_ids: list[int] = []
    for d, doc in enumerate(docs):
        data = b"".join(s_pieces[i] for i in doc)
        if d == 0:  # a character cut at the row's start is not text: its bytes are dropped
            while lead < len(data) and data[lead] & 0xC0 == 0x80:
                lead += 1
            data = data[lead:]
        text = data.decode("utf-8", errors="ignore" if d == len(docs) - 1 else "strict")  # cut at the end: dropped
        t_ids += t_tok.encode(text, add_special_tokens=False)
        if d < len(docs) - 1:
            t_ids.append(t_eos)

    def prefixes(ids, pieces, end):
        out, acc = [], b""
        for i in ids:
            acc += eos if i == end else pieces[i]
            out.append(acc)
        return out

    s_pre = [p[lead:] if len(p) > lead else None for p in prefixes(row, s_pieces, s_eos)]
    t_pre = {p: j for j, p in enumerate(prefixes(t_ids, t_pieces, t_eos))}
    with torch.no_grad():
        logits = model(torch.tensor([t_ids])).logits[0].double()  # (T, V_t)
    probs = torch.softmax(logits, -1)
    s_index = {p: i for i, p in reversed(list(enumerate(s_pieces))) if p}
    out = {}
    for i in range(len(row) - 1):
        j = t_pre.get(s_pre[i])
        if j is None:
            continue
        p, ids = probs[j].topk(K)
        mapped: dict[int, float] = {}
        for pj, tj in zip(p.tolist(), ids.tolist()):
            s = s_eos if tj == t_eos else s_index.get(t_pieces[tj])
            if s is not None:
                mapped[s] = mapped.get(s, 0.0) + pj
        out[i] = mapped
    return out


def test_different_tokenizer_cache_equals_a_reference_computed_by_hand(other_cache, other_teacher, prepared):
    """At every aligned position of 12 sequences the cache holds the reference's student ids and probabilities
    (within the stored -log p step), its tail is the teacher's mass outside them, and the unaligned positions are
    empty; the aligned share is high (the two BPEs mostly agree on word boundaries) but below 1."""
    from transformers import AutoModelForCausalLM

    from pd_lightning.corpus.tokenizer import load_tokenizer

    s_tok, t_tok = load_tokenizer(prepared["tokenizer"]), load_tokenizer(other_teacher)
    model = AutoModelForCausalLM.from_pretrained(str(other_teacher)).eval()
    cache = TeacherCache(other_cache)
    assert cache.spec.cross_tokenizer and cache.vocab_size == len(s_tok)
    tf = TokenFile(prepared["tokens"])
    step = cache.spec.nlogp_max / 16383
    aligned = total = 0
    for n in range(12):
        row = tf.rows("val", n).tolist()
        ref = reference_sequence(row, s_tok, t_tok, model)
        item = cache.read(n)
        ids, lp, tail = item["teacher_ids"], item["teacher_logprobs"], item["teacher_tail"]
        for i in range(len(row) - 1):
            got = {int(a): math.exp(float(b)) for a, b in zip(ids[i], lp[i]) if math.isfinite(float(b))}
            total += 1
            if i not in ref:
                assert not got and float(tail[i]) == 0.0, (n, i)
                continue
            aligned += 1
            want = ref[i]
            assert got.keys() == want.keys(), (n, i)
            for s, p in want.items():
                assert abs(math.log(got[s]) - math.log(p)) <= step / 2 + 1e-5, (n, i, s)
            assert float(tail[i]) == pytest.approx(1 - sum(want.values()), rel=2e-3, abs=1e-4)
    assert 0.6 < aligned / total < 1.0


def test_cache_info_reports_the_aligned_fraction_and_mapped_mass(other_cache, capsys):
    """cache-info's figures against the decoded cache: a position is aligned when it holds entries or a tail; the
    mapped mass is the teacher mass the entries hold (``1 - tail``; the decoded entries' own sum agrees within the
    stored precision)."""
    main(["cache-info", str(other_cache), "--json", "true"])
    info = json.loads(capsys.readouterr().out)
    cache = TeacherCache(other_cache)
    positions = aligned = 0
    one_minus_tail = entry_mass = 0.0
    for n in range(cache.num_sequences):
        item = cache.read(n)
        p = item["teacher_logprobs"].double().exp().sum(-1)
        tail = item["teacher_tail"].double()
        is_aligned = (p > 0) | (tail > 0)
        positions += is_aligned.numel()
        aligned += int(is_aligned.sum())
        one_minus_tail += float((1 - tail[is_aligned]).sum())
        entry_mass += float(p[is_aligned].sum())
    assert info["teacher_tokenizer_fingerprint"] == cache.spec.teacher_tokenizer_fingerprint != ""
    assert info["vocab_map_rule"] == "tail"
    assert info["aligned_fraction"] == pytest.approx(aligned / positions, abs=1e-12)
    assert info["mean_mapped_mass"] == pytest.approx(one_minus_tail / aligned, rel=1e-9)
    assert info["mean_mapped_mass"] == pytest.approx(entry_mass / aligned, rel=2e-3)
    assert 0.6 < info["aligned_fraction"] < 1 and 0 < info["mean_mapped_mass"] < 1


# ------------------------------------------------------------------------------------------------- ranks
def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_two_ranks_write_the_same_cache_as_one(tmp_path, other_teacher, other_cache, prepared):
    """DDP on 2 CPU processes, the prefix rule as well: the same content checksum as one rank."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--model.cross_tokenizer_rule", "prefix"]
    main(predict_args(other_teacher, prepared["tokens"], one, *extra))
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    args = predict_args(other_teacher, prepared["tokens"], two, *extra, *ddp)
    proc = subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert content_checksum(two) == content_checksum(one)
    assert TeacherCache(one).spec.vocab_map_rule == "prefix"
    assert content_checksum(one) != content_checksum(other_cache)  # the rule changes the content


# ------------------------------------------------------------------------------------------------- bad input
def lowercasing_bpe():
    """A byte-level BPE whose normalizer lowercases: its tokens do not spell the text they were given."""
    from tokenizers import normalizers

    tok = byte_level_bpe(english(), 600)
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    return tok


def student_without_tokenizer(prepared, folder: Path) -> Path:
    """The prepared token file (index + shards) copied without the tokenizer/ folder it names."""
    import shutil

    src = Path(prepared["tokens"])
    folder.mkdir()
    shutil.copy(src, folder / src.name)
    for p in src.parent.iterdir():
        if p.is_dir() and p.name != "tokenizer":
            shutil.copytree(p, folder / p.name)
    return folder / src.name


@pytest.mark.parametrize("case", ["no_teacher_tokenizer", "not_round_trip", "sentencepiece", "no_student_tokenizer"])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, case, other_teacher, hf_teacher, prepared):
    from tests.test_crosstok_align import _metaspace_tokenizer

    tokens, teacher, extra = prepared["tokens"], other_teacher, []
    if case == "no_teacher_tokenizer":  # the student's tokenizer's teacher, its tokenizer files removed
        import shutil

        teacher = tmp_path / "teacher"
        shutil.copytree(hf_teacher, teacher)
        for p in teacher.iterdir():
            if "token" in p.name:
                p.unlink()
        extra, want = ["--model.cross_tokenizer", "always"], f"--model.teacher {str(teacher)!r} holds no tokenizer"
    elif case == "not_round_trip":
        teacher = tiny_llama(lowercasing_bpe(), tmp_path / "teacher")
        want = f"--model.teacher {str(teacher)!r}: its tokenizer does not round-trip the bytes of val sequence 0"
    elif case == "sentencepiece":
        teacher = tiny_llama(_metaspace_tokenizer(), tmp_path / "teacher")
        want = "the teacher's tokenizer is not a byte-level BPE"
    else:
        tokens = student_without_tokenizer(prepared, tmp_path / "data")
        want = f"--data.path {str(tokens)!r}: the student's tokenizer folder"
    out = tmp_path / "cache"
    args = predict_args(teacher, tokens, out, *extra)
    proc = subprocess.run([sys.executable, "-m", "pd_lightning.cli", *args], env=env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pd-lightning: error")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert want in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


# ------------------------------------------------------------------------------------------------- fit
@pytest.mark.parametrize("loss", ["KLD", "ULD"])
def test_fit_from_a_cross_tokenizer_cache(tmp_path, other_cache, prepared, loss):
    """A student trains from the cross-tokenizer cache like from any cache (the spec's tokenizer is the student's):
    3 steps of 0.1 LM + 0.9 KD, finite and as combined; ``val/bpb`` is logged next to ``val/loss``."""
    import csv

    from tests.test_predict import fit_from_cache

    args = fit_from_cache(other_cache, prepared["tokens"], tmp_path, 3, "--model.loss",
                          f"pd_lightning.distill.losses.{loss}", "--trainer.val_check_interval", "3")  # fmt: skip
    main(args)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == 3
    for r in train:
        total, lm, kd = (float(r[k]) for k in ("train/loss", "train/lm_loss", "train/kd_loss"))
        assert math.isfinite(kd) and kd > 0
        assert total == pytest.approx(0.1 * lm + 0.9 * kd, rel=1e-5)
    val = [r for r in rows if r.get("val/bpb")]
    assert val and math.isfinite(float(val[-1]["val/bpb"]))
