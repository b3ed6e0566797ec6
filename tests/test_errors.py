"""The CLI's error boundary is narrow (issue 23): what the user can fix is one red line, a bug keeps its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl

from tests.conftest import ROOT, SAMPLE

CONFIG = """
builders = ["items", "folds", "catalog"]
[catalog]
use_spacy = false
[folds]
k = 3
price_bands = 3
[models]
learners = ["broken", "refusing"]
plugins = ["tests.broken_learner"]
threads = 1
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_a_bug_inside_cross_fitting_shows_its_traceback_and_a_user_error_is_one_line(tmp_path: Path) -> None:
    pl.read_parquet(SAMPLE / "train.parquet").head(30).write_parquet(tmp_path / "train.parquet")
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    common = ["--config", str(config), "--store", str(tmp_path / "s")]
    built = _cli("build-features", "--train", str(tmp_path / "train.parquet"), "--test", "", *common, "-q")
    assert built.returncode == 0, built.stderr[-2000:]
    bug = _cli("train", "--learner", "broken", *common, "-q")
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "IndexError" in bug.stderr
    refused = _cli("train", "--learner", "refusing", *common, "-q")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [
        "error: refusing: these rows cannot be used (a message written for the user)  (--debug shows the traceback)"]
