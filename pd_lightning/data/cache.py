"""The HDF5 teacher-logits cache: one import for its public API.

Format, encoding and index: :mod:`pd_lightning.data.cache_format`; writing (bounded shards written once,
resumable, crash-safe, background):
:mod:`pd_lightning.data.cache_writer`; reading: :mod:`pd_lightning.data.cache_reader`; verification and
statistics: :mod:`pd_lightning.data.cache_inspect`.
"""

from pd_lightning.data.cache_format import (
    SCHEMA_VERSION,
    CacheCorruptError,
    CacheError,
    CacheIncompleteError,
    CacheMismatchError,
    CacheSpec,
    content_checksum,
    read_layout,
    shard_name,
    token_source_fingerprint,
)
from pd_lightning.data.cache_inspect import cache_info, plot_entries_histogram, verify
from pd_lightning.data.cache_reader import TeacherCache
from pd_lightning.data.cache_writer import BackgroundWriter, CacheWriter

__all__ = [
    "SCHEMA_VERSION",
    "BackgroundWriter",
    "CacheCorruptError",
    "CacheError",
    "CacheIncompleteError",
    "CacheMismatchError",
    "CacheSpec",
    "CacheWriter",
    "TeacherCache",
    "cache_info",
    "content_checksum",
    "plot_entries_histogram",
    "read_layout",
    "shard_name",
    "token_source_fingerprint",
    "verify",
]
