"""The modules' names before the cache and the corpus got packages of their own (kept for old configs and checkpoints).

Configs, checkpoints and sweep folders written before the move name classes by ``class_path``, e.g.
``pd_lightning.data.cache_datamodule.CacheDataModule``. Importing such a name gives the module that now holds the
code -- the same module object, so ``pd_lightning.data.cache_datamodule.CacheDataModule is
pd_lightning.cache.datamodule.CacheDataModule``: isinstance checks and jsonargparse's class resolution agree.
New code imports from :mod:`pd_lightning.cache` and :mod:`pd_lightning.corpus`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

MOVED = {
    "cache": "pd_lightning.cache",
    "cache_format": "pd_lightning.cache.format",
    "entry_codec": "pd_lightning.cache.codec",
    "cache_writer": "pd_lightning.cache.writer",
    "cache_reader": "pd_lightning.cache.reader",
    "cache_inspect": "pd_lightning.cache.inspect",
    "cache_upgrade": "pd_lightning.cache.upgrade",
    "cache_datamodule": "pd_lightning.cache.datamodule",
    "corpus": "pd_lightning.corpus.prepare",
    "prepare_inputs": "pd_lightning.corpus.inputs",
    "prepare_worker": "pd_lightning.corpus.workers",
    "token_shards": "pd_lightning.corpus.token_shards",
    "tokenizer": "pd_lightning.corpus.tokenizer",
    "builtin_corpus": "pd_lightning.corpus.builtin",
    "datamodule": "pd_lightning.corpus.datamodule",
    "sampler": "pd_lightning.corpus.sampler",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``pd_lightning.data.<old>`` to the module that replaced it."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        if prefix != __name__ or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name.rpartition(".")[2]])
        sys.modules[spec.name] = module
        spec.loader_state = module.__spec__  # the import system is about to set __spec__ to the alias's
        return module

    def exec_module(self, module) -> None:
        # The target module is already executed; the import system has just set its __spec__ to the alias's: put
        # its own back (importlib.reload and tools that read __spec__ see the real module).
        module.__spec__ = module.__spec__.loader_state


if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.insert(0, _Alias())


def __getattr__(name: str):
    """``pd_lightning.data.cache_reader`` as an attribute (``from pd_lightning.data import cache_reader``)."""
    if name in MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
