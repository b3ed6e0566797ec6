"""The sparse text table: a real store table (Parquet list columns + JSON vocabulary) that round-trips to the exact
CSR matrix, is readable from DuckDB, stays sparse all the way into the learners, and keeps its vocabulary in a
derived (`predict`) store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from features.target_encoding import encode_column
from features.text_sparse import TextSparseBuilder
from featurestore.builders import BuildContext, run_builders
from featurestore.config import Config
from featurestore.sparse import csr_to_frame, frame_to_csr, read_sparse
from featurestore.store import FeatureStore
from pipeline.registry import builders_for
from tests.conftest import ROOT, make_config


def _sparse_config(tmp_path: Path, real_train: pl.DataFrame, real_test: pl.DataFrame) -> Config:
    return make_config(tmp_path, real_train.head(120), real_test.head(30), **{
        "catalog.use_spacy": False, "folds.k": 4, "folds.price_bands": 4,
        "builders": ["items", "folds", "catalog", "text_sparse"]})


def test_sparse_table_round_trips_and_is_sql_readable(tmp_path: Path, real_train, real_test) -> None:
    config = _sparse_config(tmp_path, real_train, real_test)
    store = FeatureStore(config.store.dir)
    run_builders(BuildContext(store, config, progress=False), builders_for(config))
    ids = store.read("items").sort("sample_id")["sample_id"]
    # The in-memory matrix the builder computes, from a fresh builder on the same store...
    builder = TextSparseBuilder(config)
    built = builder.build(BuildContext(store, config, progress=False, fingerprint="check"))
    fresh = built.table
    expected = frame_to_csr(fresh, built.extra["n_features"])
    stored = read_sparse(store, "text_sparse", ids.to_numpy())
    assert stored.shape == expected.shape and stored.nnz == expected.nnz > 0
    assert (stored != expected).nnz == 0
    # ...equals what a CSR -> Parquet -> CSR trip gives on an arbitrary matrix, row order included.
    rng = np.random.default_rng(0)
    matrix = sp.random(50, 300, density=0.05, format="csr", dtype=np.float32, random_state=rng)
    back = frame_to_csr(csr_to_frame(pl.Series("sample_id", np.arange(50)), matrix), 300)
    assert (back != matrix).nnz == 0
    # Every field has its own block of columns, and one-hot blocks hold 1.0 values.
    blocks = store.info("text_sparse").extra["blocks"]
    assert [b["block"] for b in blocks][:3] == ["item_name:word", "item_name:char", "text:word"]
    unit = next(b for b in blocks if b["block"] == "unit:onehot")
    unit_values = stored[:, unit["offset"]: unit["offset"] + unit["size"]].data
    assert unit["size"] > 0 and set(unit_values.tolist()) == {1.0}
    # Plain DuckDB SQL reads it like every other table.
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sql", "--store", config.store.dir,
                          "SELECT count(*) AS n, sum(len(indices)) AS nnz FROM text_sparse"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert str(stored.nnz) in out.stdout


def test_new_rows_get_the_training_vocabulary_and_their_stored_rows(tmp_path: Path, real_train, real_test) -> None:
    """The online path (new rows: `predict`, `serve`) transforms with the stored vocabulary: the store's own test
    rows come out exactly as stored, whatever rows they are sent with."""
    from features.text_sparse import TextSparseBuilder
    from featurestore.builders import OnlineRows

    config = _sparse_config(tmp_path, real_train, real_test)
    store = FeatureStore(config.store.dir)
    run_builders(BuildContext(store, config, progress=False), builders_for(config))
    builder = TextSparseBuilder(config)
    state = builder.online_state(store, 1)
    width = store.info("text_sparse").extra["n_features"]
    test_ids = store.read("items").filter(pl.col("split") == "test")["sample_id"].to_numpy()
    for ids in (test_ids, test_ids[-3:]):
        tables = {t: store.read(t).filter(pl.col("sample_id").is_in(ids.tolist())) for t in ("items", "catalog")}
        online = builder.online(state, OnlineRows(tables["items"], "request", tables))
        order = pl.DataFrame({"sample_id": ids}).join(online, on="sample_id", how="left", maintain_order="left")
        assert (frame_to_csr(order, width) != read_sparse(store, "text_sparse", ids)).nnz == 0


NEVER_DENSIFY = """
import sys
import numpy as np, scipy.sparse as sp
from featurestore.config import Config
from models.base import Inputs
from models.registry import learner_class
from models.train import resolved_settings

rng = np.random.default_rng(0)
n, width = 20_000, 2_000_000
# Built straight as CSR, 30 entries a row: sp.random's sampling peaked at gigabytes before the measurement began,
# so no later growth registered (the bound could not fail, and the densifying control showed it).
indices = np.sort(rng.integers(0, width, (n, 30)), axis=1).ravel()
matrix = sp.csr_matrix((rng.random(n * 30, dtype=np.float32), indices, np.arange(0, n * 30 + 1, 30)),
                       shape=(n, width))
matrix.sum_duplicates()
y = np.asarray(matrix[:, :1000].sum(axis=1)).ravel() + rng.normal(0, 0.1, n)
x = Inputs(rng.normal(size=(n, 3)).astype(np.float32), matrix)
config = Config()
config.models.sections.setdefault("mlp_sparse", {}).update(epochs=1, members=1, hidden=[8])
def peak_kib():  # VmHWM: this process's own peak; ru_maxrss starts at the parent's (a large pytest hid all growth)
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1])
before = peak_kib()
for name in ("ridge", "mlp_sparse"):
    settings = resolved_settings(config, name)
    learner = learner_class(name)(settings, 0, 1, [f"f{i}" for i in range(3 + width)], [])
    learner.fit(x.rows(np.arange(18_000)), y[:18_000], x.rows(np.arange(18_000, n)), y[18_000:])
    assert np.isfinite(learner.predict(x.rows(np.arange(100)))).all()
if sys.argv[1] == "densify":  # the control: a learner that densified only 20,000 of the 2,000,000 columns
    matrix[:, :20_000].toarray()
print((peak_kib() - before) / 1024)
"""


@pytest.mark.parametrize("mode", ["sparse", "densify"])
def test_sparse_learners_never_densify(mode: str) -> None:
    """A 20,000 x 2,000,000 matrix would take 160 GB dense; the sparse learners fit it in a few hundred MB. Run in
    a fresh process: the high-water mark of this one was raised by earlier tests (the bound could not fail)."""
    out = subprocess.run([sys.executable, "-c", NEVER_DENSIFY, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mib = float(out.stdout.strip().splitlines()[-1])
    # The MLP's first layer alone is width x 8 float32 weights (+ Adam state): ~200 MB. Densifying 1% of the
    # columns (the control) is 1.6 GB.
    if mode == "sparse":
        assert grown_mib < 1_000, f"peak memory grew by {grown_mib:.0f} MiB"
    else:
        assert grown_mib > 1_000, f"control: densifying 1% of the columns grew the peak by only {grown_mib:.0f} MiB"


def test_test_row_encodings_have_the_oof_distribution() -> None:
    """Test rows are encoded once per fold from that fold's fitting rows and averaged: their counts match the
    training rows' out-of-fold counts (from (k-1)/k of the rows), not the 1.25x of an all-rows encoding."""
    rng = np.random.default_rng(1)
    n_train, n_test, k = 4000, 1000, 5
    values = pl.Series(rng.choice([f"b{i}" for i in range(20)], n_train + n_test))
    log_price = np.concatenate([rng.normal(3, 1, n_train), np.full(n_test, np.nan)])
    fold = np.concatenate([np.arange(n_train) % k, np.full(n_test, -1)])
    encoded, counts = encode_column(values, log_price, fold, 10.0)
    train_mean, test_mean = counts[:n_train].mean(), counts[n_train:].mean()
    assert abs(test_mean / train_mean - 1) < 0.03, (train_mean, test_mean)
    assert np.isfinite(encoded).all()
    # Control: an all-rows encoding of the test rows is ~k/(k-1) larger; the test would catch it.
    all_rows = pl.DataFrame({"v": values[:n_train]}).group_by("v").len()
    looked_up = pl.DataFrame({"v": values[n_train:]}).join(all_rows, on="v", how="left")["len"].to_numpy()
    assert looked_up.mean() / train_mean > 1.2


def test_a_min_df_fallback_is_logged_and_recorded_never_silent(tmp_path: Path, real_train, real_test,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Issue 26's soft failure: a field whose min_df no term reached was silently refitted with min_df 1 (or left
    empty). Now the log says so and the manifest records it per block; the default fields on 120 rows are the
    control (no fallback)."""
    config = _sparse_config(tmp_path / "a", real_train, real_test)
    store = FeatureStore(config.store.dir)
    run_builders(BuildContext(store, config, progress=False), builders_for(config))
    assert store.info("text_sparse").extra["min_df_fallbacks"] == []
    fields = [{"columns": ["catalog.item_name"], "analyzer": "word", "min_df": 10_000},
              {"columns": ["catalog.unit"], "analyzer": "onehot", "min_df": 1}]
    strict = make_config(tmp_path / "b", real_train.head(120), real_test.head(30), **{
        "catalog.use_spacy": False, "folds.k": 4, "folds.price_bands": 4,
        "builders": ["items", "folds", "catalog", "text_sparse"], "text_sparse.fields": fields})
    store = FeatureStore(strict.store.dir)
    with caplog.at_level("WARNING"):
        run_builders(BuildContext(store, strict, progress=False), builders_for(strict))
    assert "no term occurs in 10000 rows" in caplog.text
    fallbacks = store.info("text_sparse").extra["min_df_fallbacks"]
    assert [(f["block"], f["min_df"], f["min_df_used"]) for f in fallbacks] == [("item_name:word", 10_000, 1)]
