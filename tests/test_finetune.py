"""The fine-tuned transformer regressor on CPU, on tens of real rows, through the CLI: train, the saved safetensors
fold models reproduce the test predictions, a kill -9 mid-train resumes at the first fold without a model and
ends identical, and the CPU cap refuses with one line. The OOF leak test and the learner contract run over every
learner (tests/test_models.py, tests/test_contract.py), this one included."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from featurestore.config import load_config
from featurestore.store import FeatureStore
from models.inference import predict_saved
from models.train import TrainedLearner
from tests.conftest import ROOT, SAMPLE, kill9

CONFIG = """builders = ["items", "folds"]
[folds]
k = 3
price_bands = 3
[models]
learners = ["finetune"]
threads = 1
[models.finetune]
max_seq_length = 32
epochs = 2
batch_size = 16
"""


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def _store_args(tmp: Path) -> list[str]:
    return ["--config", str(tmp / "c.toml"), "--store", str(tmp / "store")]


def _prepare(tmp: Path, body: str = CONFIG) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    pl.read_parquet(SAMPLE / "train.parquet").head(48).write_parquet(tmp / "train.parquet")
    pl.read_parquet(SAMPLE / "test.parquet").head(8).write_parquet(tmp / "test.parquet")
    (tmp / "c.toml").write_text(body)
    result = _cli("build-features", *_store_args(tmp), "--train", str(tmp / "train.parquet"),
                  "--test", str(tmp / "test.parquet"), "-q")
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("finetune")
    _prepare(tmp)
    result = _cli("train", *_store_args(tmp), "-q")
    assert result.returncode == 0, result.stderr
    return tmp


def _oof(tmp: Path) -> pl.DataFrame:
    return FeatureStore(tmp / "store", create=False).read("oof__finetune").sort("sample_id")


def test_cli_trains_finetune_out_of_fold_on_cpu(trained: Path) -> None:
    from safetensors import safe_open

    store = FeatureStore(trained / "store", create=False)
    oof = _oof(trained)
    assert oof.height == 56 and oof["pred_price"].is_finite().all()
    assert oof.filter(pl.col("fold") >= 0)["pred"].n_unique() > 10, "a constant: the head never left its start"
    record = TrainedLearner.of(store, "finetune")
    assert record.folds == [0, 1, 2] and record.objective == "huber"
    for k in record.folds:
        path = store.root / record.model_dir / f"finetune_fold{k}.safetensors"
        with safe_open(str(path), framework="pt") as fh:
            assert fh.metadata()["backbone"] == "minilm"
            assert any(key.startswith("head.") for key in fh.keys())


def test_saved_fold_models_reproduce_the_test_predictions(trained: Path) -> None:
    config = load_config(trained / "c.toml", {"store.dir": str(trained / "store")})
    store = FeatureStore(trained / "store", create=False)
    again = predict_saved(store, store, config, "finetune").sort("sample_id")
    test = _oof(trained).filter(pl.col("fold") < 0)
    assert again["sample_id"].to_list() == test["sample_id"].to_list()
    assert np.array_equal(again["pred"].to_numpy(), test["pred"].to_numpy())


def test_killed_train_resumes_at_the_first_missing_fold(trained: Path, tmp_path: Path) -> None:
    _prepare(tmp_path)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", *_store_args(tmp_path), "-q"], cwd=ROOT)
    models = tmp_path / "store" / "models" / "finetune"
    deadline = time.time() + 300
    while not list(models.glob("*/finetune_fold0.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    fold0 = list(models.glob("*/finetune_fold0.safetensors"))
    assert fold0, "train never saved fold 0"
    kill9(proc)
    # Killed mid-train: the learner's table was not committed (the file, its manifest row) though fold 0 was saved.
    assert proc.returncode == -9 and not (tmp_path / "store" / "tables" / "oof__finetune.parquet").exists()
    assert FeatureStore(tmp_path / "store", create=False).info("oof__finetune") is None
    before = os.stat(fold0[0])
    result = _cli("train", *_store_args(tmp_path), "-q")
    assert result.returncode == 0, result.stderr
    after = os.stat(fold0[0])
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "fold 0 was fitted again"
    resumed, straight = _oof(tmp_path), _oof(trained)
    assert np.array_equal(resumed["pred"].to_numpy(), straight["pred"].to_numpy()), "resume changed predictions"


def test_cpu_cap_refuses_with_one_line_and_keeps_the_models(trained: Path) -> None:
    before = _oof(trained)
    capped = trained / "capped.toml"
    capped.write_text(CONFIG + "max_rows_cpu = 10\n")
    result = _cli("train", "--config", str(capped), "--store", str(trained / "store"), "-q")
    assert result.returncode == 1
    assert "max_rows_cpu = 10" in result.stderr and "run on a GPU" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _oof(trained).equals(before)
