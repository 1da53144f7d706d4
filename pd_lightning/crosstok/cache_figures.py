"""``cache-info`` figures of a cross-tokenizer cache (issue 20): how much of the student's text the teacher's
targets cover, and how much of the teacher's probability lands on student tokens.

A cross-tokenizer cache marks its unaligned positions by an empty row: no entry and a zero tail (``vocab_map.
masked_targets``); an aligned position always has entries or a tail (its teacher mass goes somewhere). So, from the
stored ``counts`` and ``tail`` alone (both schemas):

- ``aligned_fraction``: aligned positions / positions.
- ``mean_mapped_mass``: mean over aligned positions of ``1 - tail``: the share of the teacher's whole distribution
  that the stored entries hold -- the kept (top-p-k) mass that found a student token (an exact byte match, or a
  prefix token under rule ``prefix``). The same figure for a same-tokenizer cache is its ``mean_kept_mass``; the
  ratio of the two is the share of the kept mass matched.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pd_lightning.cache.format import read_dataset

_BLOCK = 1 << 20  # positions read per step


def cross_tokenizer_figures(files: Sequence[Path], spec) -> dict[str, Any]:
    """The cross-tokenizer keys of ``cache_info`` for the shards ``files`` of a cache with spec ``spec``."""
    positions = aligned = 0
    mass = 0.0
    for file in files:
        with h5py.File(file, "r") as f:
            n = f["counts"].shape[0]
            for a in range(0, n, _BLOCK):
                sel = slice(a, min(a + _BLOCK, n))
                counts = read_dataset(file, f["counts"], sel)
                tail = read_dataset(file, f["tail"], sel).astype(np.float64)
                is_aligned = (counts > 0) | (tail > 0)
                positions += counts.shape[0]
                aligned += int(is_aligned.sum())
                mass += float((1.0 - tail[is_aligned]).sum())
    return {
        "teacher_tokenizer_fingerprint": spec.teacher_tokenizer_fingerprint,
        "vocab_map_rule": spec.vocab_map_rule,
        "aligned_fraction": aligned / max(positions, 1),
        "mean_mapped_mass": mass / max(aligned, 1),
    }
