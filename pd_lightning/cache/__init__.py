"""The HDF5 teacher-logits cache: one import for its public API.

Format, encoding and index: :mod:`pd_lightning.cache.format`; writing (bounded shards written once,
resumable, crash-safe, background):
:mod:`pd_lightning.cache.writer`; reading: :mod:`pd_lightning.cache.reader`; verification and
statistics: :mod:`pd_lightning.cache.inspect`.
"""

from pd_lightning.cache.format import (
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
from pd_lightning.cache.inspect import cache_info, plot_entries_histogram, verify
from pd_lightning.cache.reader import TeacherCache
from pd_lightning.cache.writer import BackgroundWriter, CacheWriter

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
