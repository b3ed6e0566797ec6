"""Hashes of code, for fingerprints: a table, a learner or a stack study is redone when its code changes."""

from __future__ import annotations

import ast
import hashlib
import inspect
from pathlib import Path


def _code_without_comments(source: str) -> str:
    """The module's syntax tree without docstrings: comments, docstrings, blank lines and formatting never
    change a fingerprint (re-embedding every text for a typo fix cost minutes); any code change does."""
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
