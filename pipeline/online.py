"""Pricing new rows without touching the store: `predict` (a file), `Context.predict` (a frame) and `serve` (HTTP
requests) all go through `Predictor`, so they give the same price for the same row, bit for bit.

Loaded once: the stack's run record and meta-learner, each learner's fold models and matrix spec, and every
needed builder's online state (pipeline.registry builders; `FeatureBuilder.online_state`: a vocabulary, the
encoders, the training rows' prices and kNN indexes). Per call: the new rows go through the builders' online
paths in build order (each gives its table's rows for the new rows only, as `build` gives a test row), then the
fold models (mean over folds, as for test rows in training) and the meta-learner. Nothing is written.

Guaranteed: a row's price does not depend on the other rows sent with it (encoders run one row per batch, kNN
search uses one kernel whatever the batch size, the MLPs predict in float64, metas row by row); the same rows
give the same prices as the stack's own test predictions when the feature tables were built the same way (see
tests/test_models.py::test_predict_reproduces_test_time_features_and_predictions). Not guaranteed: with int8 ONNX
text encoders the stack's own test rows were encoded in batches of 32, so their vectors (and prices) differ in the
last digits from a one-row encoding.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import polars as pl

from featurestore.builders import FeatureBuilder, OnlineRows, in_row_order
from featurestore.config import Config
from featurestore.devices import threads as config_threads
from featurestore.errors import ConfigError, InputError, StaleTable
from featurestore.folds import FoldMean
from featurestore.names import oof_table
from featurestore.store import FeatureStore
from models.base import BaseLearner
from models.matrix import MatrixSpec, online_inputs
from models.metrics import to_price
from models.train import SPEC_FILE, TrainedLearner, learner_builders, make_learner, task_target
from pipeline.registry import builders_for, config_as_built, require_fresh
from stacking.artifacts import load_stack_meta, stack_key
from stacking.meta import MetaLearner
from stacking.record import StackRecord

FIX = "python cli.py build-features && python cli.py stack"


def require_current_stack(config: Config, store: FeatureStore, trained: StackRecord) -> None:
    """The stored stack must still match what it was trained from: the train file, the feature tables, the
    learners and the stacking settings. Otherwise its predictions would silently mix old models with new data."""
    tables = tables_used(store, trained.learners, trained.raw_features) | {oof_table(n) for n in trained.learners}
    require_fresh(config, store, tables, learner_builders(config, trained.learners), fix=FIX)
    if stack_key(store, config) != trained.study_key:
        raise StaleTable(f"the stack in {store.root} was tuned on other learner tables or stacking settings than "
                         f"the store and config hold now (learners retrained, or [stacking] changed); run `{FIX}`")


def tables_used(store: FeatureStore, learners: list[str], raw_features: list[str]) -> set[str]:
    used = {f.partition(".")[0] for f in raw_features}
    for name in learners:
        model_dir = store.root / TrainedLearner.of(store, name).model_dir
        used |= set(MatrixSpec.load(model_dir / SPEC_FILE).tables)
    return used


class _Learner:
    """One trained learner, loaded: its matrix spec and fold models (in fold order, as training averaged them)."""

    def __init__(self, store: FeatureStore, config: Config, name: str) -> None:
        trained = TrainedLearner.of(store, name)
        trained.verify(store, f"retrain it: `python cli.py train --learner {name} --force`")
        model_dir = store.root / trained.model_dir
        self.name = name
        self.spec = MatrixSpec.load(model_dir / SPEC_FILE)
        make = make_learner(config, name, self.spec)
        self.folds: list[BaseLearner] = []
        for k in trained.folds:
            learner = make(k)
            self.folds.append(learner.load(model_dir / learner.file_pattern.format(fold=k)))
        self.target = task_target(config)

    def predict_price(self, tables: dict[str, pl.DataFrame], shared: dict | None = None) -> np.ndarray:
        """Each new row's price: the mean over fold models in the target's space, as `cross_fit` gave test rows
        (the stack reads its log1p, as from the oof__ table's pred_log). `shared`: online_inputs' per-call cache."""
        x = online_inputs(self.spec, tables, shared)
        mean = FoldMean(len(x))
        for learner in self.folds:
            mean.add(learner.predict(x))
        return to_price(mean.mean(), self.target)


class Predictor:
    """Loaded once from a trained store (`stack` done); `predict(rows)` prices new rows. Thread-safe: calls are
    serialised (the loaded models are not all safe to share between threads)."""

    def __init__(self, config: Config, store: FeatureStore, threads: int | None = None) -> None:
        self.record = StackRecord.of(store)
        require_current_stack(config, store, self.record)
        config = config_as_built(config, store)
        self.store = store
        self.threads = threads or config_threads(config)
        self.builders = _needed(builders_for(config),
                                tables_used(store, self.record.learners, self.record.raw_features))
        missing = [type(b).__name__ for b in self.builders if not b.supports_online]
        if missing:
            raise ConfigError(f"builder(s) {', '.join(missing)} have no online path (FeatureBuilder.online_state / "
                              "online), so new rows cannot be priced; implement them or take the builder's tables "
                              "out of the learners")
        self.states = {b.table: b.online_state(store, self.threads) for b in self.builders}
        self.learners = [_Learner(store, config, name) for name in self.record.learners]
        self.meta: MetaLearner
        self.meta, self.feature_names = load_stack_meta(store, self.record, config)
        self._lock = threading.Lock()

    def predict(self, raw: pl.DataFrame, source: str = "request", learners: bool = False) -> pl.DataFrame:
        """sample_id and price per row of `raw` (the data file's columns), in `raw`'s order; with `learners`,
        each base learner's price too (`pred_<learner>`)."""
        if raw.height == 0:
            raise InputError(f"{source}: no rows to price")
        with self._lock:
            rows = OnlineRows(raw, source)
            for builder in self.builders:
                table = builder.online(self.states[builder.table], rows)
                # Every table in the new rows' order ("items" sets it), one row each.
                rows.tables[builder.table] = table if builder.table == "items" else in_row_order(
                    rows.tables["items"], table)
            shared: dict = {}  # inputs the learners have in common, made once per call
            base = {learner.name: learner.predict_price(rows.tables, shared) for learner in self.learners}
            x = np.column_stack([self._meta_column(name, base, rows.tables) for name in self.feature_names])
            price = np.clip(np.expm1(self.meta.predict(x)), 0.01, None)
        out = rows.tables["items"].select("sample_id").with_columns(pl.Series("price", price))
        if learners:
            out = out.with_columns(pl.Series(f"pred_{n}", v) for n, v in base.items())
        return out

    @staticmethod
    def _meta_column(name: str, base: dict[str, np.ndarray], tables: dict[str, pl.DataFrame]) -> np.ndarray:
        if name in base:
            return np.log1p(base[name])
        table, _, column = name.partition(".")
        return tables[table][column].cast(pl.Float64).fill_null(np.nan).to_numpy()

    def predict_file(self, path: Path) -> pl.DataFrame:
        from features.ingest import read_raw

        return self.predict(read_raw(path), str(path))


def _needed(builders: list[FeatureBuilder], tables: set[str]) -> list[FeatureBuilder]:
    """The builders of `tables` and of everything they read, in build order (items first)."""
    by_table = {b.table: b for b in builders}
    needed = {"items"}
    todo = [t for t in tables if t in by_table]
    while todo:
        table = todo.pop()
        if table in needed and table != "items":
            continue
        needed.add(table)
        todo += [t for t in by_table[table].inputs if t in by_table and t not in needed]
    return [b for b in builders if b.table in needed]
