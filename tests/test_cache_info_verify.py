"""`pd-lightning cache-info` checks the cache (issue item 3): it reads every byte by default, so a bit-flipped shard
(which `fit` refuses) is reported by name with exit 2 instead of `complete: True`; `--verify false` gives the quick
figures and says plainly that no checksum was read."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest

from pd_lightning.cli import main
from pd_lightning.distill.processors import TopPK
from tests.test_cache import write_cache


def _flip(shard: Path, dataset: str | None = None) -> None:
    """One bit flipped in the first chunk of ``dataset`` (default: the entries, 'blocks' or 'entries')."""
    with h5py.File(shard) as f:
        dataset = dataset or _entries(f)
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as fh:
        fh.seek(offset + 17)
        byte = fh.read(1)
        fh.seek(offset + 17)
        fh.write(bytes([byte[0] ^ 0x10]))


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _entries(f: h5py.File) -> str:
    return "blocks" if "blocks" in f else "entries"  # schema 3's coded blocks, schema 2's packed entries


@pytest.fixture(params=[2, 3], ids=["schema2", "schema3"])
def cache(tmp_path: Path, request) -> Path:
    write_cache(tmp_path / "c", TopPK(0.9, 12), num=6, shard_tokens=2 * 16, chunk_entries=256, schema=request.param)
    return tmp_path / "c"


def test_a_sound_cache_is_verified(cache, capsys):
    code, out, err = _run(["cache-info", str(cache)], capsys)
    assert code == 0, err
    assert "verified: True (every byte of the 3 finished shards read, checksums match)" in out
    code, out, _ = _run(["cache-info", str(cache), "--json", "true"], capsys)
    assert json.loads(out)["verified"] is True


def test_a_bit_flip_is_reported_by_shard_name_with_exit_2(cache, capsys):
    _flip(cache / "shard-000001.h5")
    code, out, err = _run(["cache-info", str(cache)], capsys)
    lines = [s for s in err.splitlines() if s.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("pd-lightning: error: cache-info: 1 of 3 shards of ")
    with h5py.File(cache / "shard-000001.h5") as f:
        name = _entries(f)
    assert "shard-000001.h5" in lines[0] and f"'/{name}'" in lines[0] and "shard-000000.h5" not in lines[0]
    assert "complete: True" not in out
    _flip(cache / "shard-000002.h5", "counts")  # every damaged shard is named, not only the first
    code, _, err = _run(["cache-info", str(cache), "--json", "true"], capsys)
    assert code == 2 and "2 of 3 shards" in err and "shard-000001.h5" in err and "shard-000002.h5" in err


def test_verify_false_says_it_did_not(cache, capsys):
    _flip(cache / "shard-000001.h5")
    code, out, err = _run(["cache-info", str(cache), "--verify", "false"], capsys)
    assert code == 0, err
    assert "verified: False (checksums not read: --verify false; run without it to check every byte)" in out
