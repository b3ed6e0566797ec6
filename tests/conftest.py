from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.config import Config, load_config  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402

# The plug-ins shipped with the tests register before collection, so the registry-wide contract tests (every
# learner, every meta-learner, every feature builder) cover them like the built-ins, without naming them.
for _plugin in ("tests.toy_learner", "tests.toy_meta", "tests.toy_builder"):
    importlib.import_module(_plugin)

SAMPLE = ROOT / "data" / "sample"
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def real_train() -> pl.DataFrame:
    return pl.read_parquet(SAMPLE / "train.parquet")


@pytest.fixture(scope="session")
def real_test() -> pl.DataFrame:
    return pl.read_parquet(SAMPLE / "test.parquet")


def make_config(tmp_path: Path, train: pl.DataFrame, test: pl.DataFrame | None, **overrides: object) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_path = tmp_path / "train.parquet"
    train.write_parquet(train_path)
    test_path = ""
    if test is not None:
        test.write_parquet(tmp_path / "test.parquet")
        test_path = str(tmp_path / "test.parquet")
    values = {"data.train": str(train_path), "data.test": test_path, "store.dir": str(tmp_path / "store")}
    values.update(overrides)
    return load_config(None, values)


@pytest.fixture
def small_config(tmp_path: Path, real_train: pl.DataFrame, real_test: pl.DataFrame) -> Config:
    """40 real labelled rows + 10 real unlabelled rows; tabular builders only, no spaCy (their own tests cover
    the embedding jobs and NER)."""
    return make_config(tmp_path, real_train.head(40), real_test.head(10), **{
        "catalog.use_spacy": False, "folds.k": 4, "folds.price_bands": 4, "builders": ["items", "folds", "catalog"]})


@pytest.fixture
def store(small_config: Config) -> FeatureStore:
    return FeatureStore(small_config.store.dir)


def start_until(args: list[str], marker: Path, timeout: float = 120.0) -> subprocess.Popen[bytes]:
    """Start a process and return once it has created `marker` (the point a crash test kills it at)."""
    proc = subprocess.Popen(args)
    deadline = time.time() + timeout
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), f"the helper process never reached {marker.name}"
    return proc


def kill9(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL: a crash, no cleanup runs."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
