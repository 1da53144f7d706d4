"""`pd-lightning cache-plan`: expected size, shards, disk and bandwidth, against hand-computed figures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pd_lightning.cache import CacheSpec, CacheWriter, cache_info
from pd_lightning.cache.inspect import SCHEMA3_BYTES_PER_ENTRY
from pd_lightning.cli import main
from pd_lightning.distill.processors import TopPK


def plan(capsys, *args: str) -> dict:
    main(["cache-plan", *args, "--json", "true"])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("schema", [2, 3])
def test_paper_setting_by_hand(capsys, schema: int) -> None:
    got = plan(capsys, "--tokens", "100e9", "--vocab", "151552", "--p", "0.95", "--k", "100",
               "--teacher-tokens-per-s", "20000", "--gpus", "8", "--schema", str(schema))  # fmt: skip
    if schema == 2:
        # 4 token + 1 count + 6 (std, entropy, tail) + 2 (one gamma) + 20 / 4096 + 100 entries x 4 B x (1 + 4 / 16384)
        per_token = 4 + 1 + 6 + 2 + 20 / 4096 + 100 * 4 * (1 + 4 / 16384)
    else:  # the same + 8 B of block offsets per 2,048 positions + 100 entries x the measured schema-3 bytes/entry
        per_token = 4 + 1 + 6 + 2 + 20 / 4096 + 8 / 2048 + 100 * SCHEMA3_BYTES_PER_ENTRY
        assert SCHEMA3_BYTES_PER_ENTRY <= 3.0 and "151,552" in got["bytes_per_entry_source"]
    assert got["schema"] == schema
    assert got["bytes_per_token"] == pytest.approx(per_token)
    assert got["total_TB"] == pytest.approx(100e9 * per_token / 1e12)
    assert got["shards"] == math.ceil(100e9 / 8388608) and got["shard_tokens"] == 8388608
    assert got["disk_per_gpu_TB"] == pytest.approx(got["total_TB"] / 8)
    assert got["write_MB_per_s_per_gpu"] == pytest.approx(20000 * per_token / 1e6)
    assert got["hours"] == pytest.approx(100e9 / 8 / 20000 / 3600)
    main(["cache-plan", "--tokens", "1e9", "--vocab", "300000", "--schema", str(schema)])  # the table
    out = capsys.readouterr().out
    assert "total size" in out and "write per GPU" in out and "assumed = k = 100" in out
    if schema == 2:  # ids above 2^18 take 8 B
        assert plan(capsys, "--tokens", "1e9", "--vocab", "300000", "--schema", "2")["bytes_per_entry"] > 8


def sample_cache(path, sequences: int, schema: int = 3) -> None:
    """A small real top-0.9-20 cache (300-entry vocabulary, 16-token sequences of random logits) at ``path``."""
    proc = TopPK(0.9, 20)
    spec = CacheSpec.for_processor(proc, vocab_size=300, seq_len=16, num_sequences=sequences, teacher_fingerprint="t",
                                   tokenizer_fingerprint="k", source_fingerprint="s")  # fmt: skip
    writer = CacheWriter(path, spec, schema=schema)
    for i in range(sequences):
        g = torch.Generator().manual_seed(i)
        writer.write(torch.tensor([i]), torch.zeros(1, 17, dtype=torch.long), proc(torch.randn(16, 300, generator=g)))
    writer.finalize()


@pytest.mark.parametrize("schema", [2, 3])
def test_from_a_sample_cache(tmp_path, capsys, schema: int) -> None:
    sample_cache(tmp_path, 6, schema)  # written with top-0.9-20
    info = cache_info(tmp_path)
    measured = info["mean_entries_per_token"]
    got = plan(capsys, "--tokens", "1e9", "--vocab", "300", "--k", "20", "--from-cache", str(tmp_path),
               "--schema", str(schema))  # fmt: skip
    assert got["entries_per_token"] == pytest.approx(measured) and str(tmp_path) in got["entries_per_token_source"]
    if schema == 2:
        assert got["bytes_per_token"] == pytest.approx(4 + 1 + 6 + 2 + 20 / 4096 + measured * 4 * (1 + 4 / 16384))
    else:  # the sample's own schema-3 coding of this teacher's entries
        assert got["bytes_per_entry"] == pytest.approx(info["bytes_per_entry"])
        assert str(tmp_path) in got["bytes_per_entry_source"]
        per_token = 4 + 1 + 6 + 2 + 20 / 4096 + 8 / 2048 + measured * info["bytes_per_entry"]
        assert got["bytes_per_token"] == pytest.approx(per_token)
    with pytest.raises(SystemExit) as e:
        main(["cache-plan", "--vocab", "300"])
    assert e.value.code == 2 and "--tokens" in capsys.readouterr().err


def test_sample_of_another_processor_is_refused(tmp_path, capsys) -> None:
    """A sample written with other p/k than the plan's would give its entries/token to the wrong processor."""
    sample_cache(tmp_path, 2)  # written with top-0.9-20
    for flags in (["--k", "50"], ["--p", "0.95", "--k", "20"]):
        with pytest.raises(SystemExit) as e:
            main(["cache-plan", "--tokens", "1e9", "--vocab", "300", *flags, "--from-cache", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(tmp_path) in err and "top-0.9-20" in err, err
    got = plan(capsys, "--tokens", "1e9", "--vocab", "300", "--from-cache", str(tmp_path))  # p, k from the sample
    assert got["processor"] == "top-0.9-20"
    with pytest.raises(SystemExit) as e:
        main(["cache-plan", "--tokens", "1e9", "--vocab", "300", "--p", "1.5"])
    assert e.value.code == 2 and "--p" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "names"),
    [
        (["--tokens", "1e300"], ("--tokens", "1e+300")),
        (["--tokens", "inf"], ("--tokens", "inf")),
        (["--tokens", "nan"], ("--tokens", "nan")),
        (["--tokens", "0.5"], ("--tokens", "0.5")),
        (["--shard_tokens", "0"], ("--shard_tokens", "0")),
        (["--shard-tokens", "-5"], ("--shard_tokens", "-5")),
        (["--teacher-tokens-per-s", "1e300"], ("--teacher_tokens_per_s",)),
        (["--teacher_tokens_per_s", "nan"], ("--teacher_tokens_per_s", "nan")),
        (["--gpus", "0"], ("--gpus", "0")),
        (["--gpus", "10000000000"], ("--gpus",)),
        (["--k", "5000"], ("--k", "5000", "--vocab 1000")),
        (["--seq_len", "0"], ("--seq_len", "0")),
        (["--power_gammas", "-1"], ("--power_gammas", "-1")),
        (["--p", "nan"], ("--p", "nan")),
    ],
)
def test_absurd_or_invalid_values_are_refused_in_one_line(capsys, flags, names) -> None:
    """Issue item 12: --tokens 1e300 printed 300-digit sizes (exit 0); --shard_tokens 0 silently planned 4096."""
    with pytest.raises(SystemExit) as e:
        main(["cache-plan", "--tokens", "1e9", "--vocab", "1000", *flags])
    lines = [s for s in capsys.readouterr().err.splitlines() if s.strip()]
    assert e.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("pd-lightning: error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_the_largest_real_plans_still_work(capsys) -> None:
    """The bounds refuse only the absurd: 1e15 tokens on 100,000 GPUs, a 2^24 vocabulary, a 1-token shard."""
    got = plan(capsys, "--tokens", "1e15", "--vocab", str(2**24), "--gpus", "100000", "--k", "1000")
    assert got["total_TB"] == pytest.approx(1e15 * got["bytes_per_token"] / 1e12) and got["shards"] > 0
    got = plan(capsys, "--tokens", "1e6", "--vocab", "1000", "--shard_tokens", "1", "--seq_len", "16")
    assert got["shard_tokens"] == 16  # a shard holds at least one whole sequence, as the writer makes it
