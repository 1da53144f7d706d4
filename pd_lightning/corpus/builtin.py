"""The embedded default corpus: real English text that every machine with Python has offline.

It is the documentation shipped with the running Python: the language reference topics of ``pydoc_data.topics``
(the text behind ``help("if")`` etc.) and the docstrings of the standard library's modules, classes and
functions, read from the ``.py`` sources with ``ast`` (no module is imported). The order is deterministic (sorted
paths), so on one Python version the corpus is identical everywhere. About 2-3 MB of text on CPython 3.11.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

# Test suites and vendored code: not documentation.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}
MIN_CHARS = 200  # shorter docstrings are mostly one-liners; they add little text and many EOS tokens


def _docstrings(path: Path) -> Iterator[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_CHARS:
                yield doc


def builtin_sources() -> list[str]:
    """The sources of the default corpus, in order: ``"topics"`` (the pydoc topics), then the stdlib ``.py`` files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(stdlib.rglob("*.py")) if not _SKIP_DIRS.intersection(p.relative_to(stdlib).parts)]
    return ["topics", *map(str, files)]


def builtin_documents(start: int = 0, stop: int | None = None) -> Iterator[str]:
    """Yield the documents of sources ``start:stop`` of the default corpus (all by default): pydoc topics first,
    then stdlib docstrings. ``prepare`` tokenizes ranges of sources in parallel."""
    for source in builtin_sources()[start:stop]:
        if source == "topics":
            from pydoc_data.topics import topics

            for key in sorted(topics):
                yield topics[key]
        else:
            yield from _docstrings(Path(source))
