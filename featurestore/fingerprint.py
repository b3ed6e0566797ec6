"""Hashes of code, for fingerprints: a table, a learner or a stack study is redone when its code changes."""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import threading
from pathlib import Path

# CPython 3.11's parser is not safe to run from two threads at once ("SystemError: AST constructor recursion depth
# mismatch", seen when a wave of builders fingerprinted themselves in parallel): one parse at a time.
_PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=256)
def _code_without_comments(source: str) -> str:
    """The module's syntax tree without docstrings: comments, docstrings, blank lines and formatting never
    change a fingerprint (re-embedding every text for a typo fix cost minutes); any code change does."""
    with _PARSE_LOCK:
        tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]  # type: ignore[attr-defined]
    return ast.dump(tree)


def code_hash(sources: tuple[object, ...]) -> str:
    """Hash of the code (not the comments) of the modules defining `sources` (classes or modules)."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(_code_without_comments(Path(inspect.getfile(source)).read_text()).encode())  # type: ignore[arg-type]
    return digest.hexdigest()[:12]
