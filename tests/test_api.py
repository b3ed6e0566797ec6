"""The Python API (pipeline.context.Context): the README's example runs as written, and its prices are the
`predict` command's for the same rows; errors are the CLI's typed errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from featurestore.errors import ConfigError, UserError
from pipeline.context import Context
from tests.conftest import ROOT


def readme_example(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert found, f"README has no `<!-- example: {name} -->` python block"
    return found.group(1)


def test_the_readme_python_example_runs_as_written_and_predicts_like_the_cli(tmp_path: Path) -> None:
    # The repository root as a user sees it, without their ./store: configs copied, the sample data linked.
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    (tmp_path / "data").symlink_to(ROOT / "data")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", readme_example("api")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sample_id" in run.stdout and "price" in run.stdout
    # The same rows through the CLI's `predict`: the same prices, bit for bit.
    rows = pl.read_parquet(ROOT / "data" / "sample" / "test.parquet").head(3)
    rows.write_parquet(tmp_path / "new.parquet")
    cli = subprocess.run([sys.executable, str(ROOT / "cli.py"), "predict", "--input", "new.parquet", "--out",
                          "cli.csv", "--store", "store_api", "-q"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    os.chdir(tmp_path)
    try:
        api = Context("configs/default.toml", overrides={"store.dir": "store_api"}).predict(rows)
    finally:
        os.chdir(ROOT)
    from_cli = pl.read_csv(tmp_path / "cli.csv")
    assert api["sample_id"].cast(pl.Utf8).to_list() == from_cli["sample_id"].cast(pl.Utf8).to_list()
    assert api["price"].to_list() == from_cli["price"].to_list()


def test_the_api_raises_the_clis_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stacking.selection must be one of within_se, lowest"):
        Context(ROOT / "configs" / "default.toml", overrides={"stacking.selection": "best"})
    ctx = Context(ROOT / "configs" / "default.toml", overrides={"store.dir": str(tmp_path / "none")}, learners=False)
    with pytest.raises(UserError):
        ctx.tables()
    assert not (tmp_path / "none").exists()  # a reading verb never makes a store
    with pytest.raises(UserError, match="polars DataFrame"):
        ctx.predict([{"sample_id": 1}])  # type: ignore[arg-type]
