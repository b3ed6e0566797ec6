"""Imports run downward only: featurestore < weights < {features, embeddings, models, sql} < stacking < pipeline
< cli.

Every import is checked, function-level ones too (a lazy import is still a dependency). Peers in the middle
layer do not import each other: what two of them share lives in featurestore (or, for model weights, in
weights)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

LAYERS = {"featurestore": 0, "weights": 1, "features": 2, "embeddings": 2, "models": 2, "sql": 2, "stacking": 3,
          "pipeline": 4, "cli": 5}


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def layer_violations() -> list[str]:
    problems = []
    for package, rank in LAYERS.items():
        files = [ROOT / "cli.py"] if package == "cli" else sorted((ROOT / package).rglob("*.py"))
        for path in files:
            for line, module in _imports(path):
                target = module.split(".")[0]
                if target not in LAYERS or target == package:
                    continue
                if LAYERS[target] >= rank:
                    problems.append(f"{path.relative_to(ROOT)}:{line} imports {module} "
                                    f"({package} is layer {rank}, {target} layer {LAYERS[target]})")
    return problems


def test_imports_run_downward_only() -> None:
    assert layer_violations() == []


def test_the_check_catches_an_upward_import(tmp_path: Path, monkeypatch) -> None:
    """The control: an upward import (featurestore importing models) and a peer import are reported."""
    import tests.test_layers as module

    fake = tmp_path / "root"
    for package in LAYERS:
        if package != "cli":
            (fake / package).mkdir(parents=True)
    (fake / "cli.py").write_text("import pipeline.run\n")
    (fake / "featurestore" / "store.py").write_text("def f():\n    from models.train import x\n")
    (fake / "features" / "knn.py").write_text("from embeddings.text import y\nfrom featurestore import store\n")
    monkeypatch.setattr(module, "ROOT", fake)
    problems = module.layer_violations()
    assert len(problems) == 2
    assert any("featurestore/store.py:2 imports models.train" in p for p in problems)
    assert any("features/knn.py:1 imports embeddings.text" in p for p in problems)
