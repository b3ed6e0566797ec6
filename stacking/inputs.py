"""The stack's input: items + folds + each base learner's out-of-fold `pred_log` + raw features, as one
numpy matrix (`StackInputs`). Raw features are refused when they name the target, the folds or predictions."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from featurestore.errors import ConfigError, MissingTable
from featurestore.names import (
    FOLDS,
    ITEMS,
    feature_table_problem,
    label_column_problem,
    oof_table,
)
from featurestore.store import FeatureStore, quote_ident
from models.matrix import left_join, query_items
from models.metrics import metric
from stacking.meta import MetaLearner, meta_class

log = logging.getLogger(__name__)

# Meta fits run single-threaded everywhere (workers and the final refit), so a refit reproduces the evaluated

# Meta fits run single-threaded everywhere (workers and the final refit), so a refit reproduces the evaluated
# model bit for bit and parallel candidates do not fight over cores.
META_THREADS = 1


@dataclass
class StackInputs:
    ids: np.ndarray
    fold: np.ndarray  # -1 on test rows
    price: np.ndarray  # NaN on test rows
    x: np.ndarray  # base predictions (log1p price) first, then raw features
    feature_names: list[str]
    n_base: int
    metric: str = "smape"  # the task's metric: candidates are scored and chosen by it

    @functools.cached_property
    def weight(self) -> np.ndarray | None:
        """Row weights the metas fit with (MAPE: 1/y); NaN on test rows (never fitted)."""
        train = ~np.isnan(self.price)
        weights = metric(self.metric).fit_weights(self.price[train])
        if weights is None:
            return None
        out = np.full(len(self.price), np.nan)
        out[train] = weights
        return out

    @functools.cached_property
    def y(self) -> np.ndarray:
        """log1p(price), computed once: every one of a study's thousands of fits reads it."""
        return np.log1p(self.price)


def meta_frame(store: FeatureStore, learners: list[str], raw_features: list[str]) -> pl.DataFrame:
    """items + folds + each learner's pred_log + raw features, joined by DuckDB, ordered by sample_id."""
    select: list[str] = []
    joins = []
    for n, learner in enumerate(learners):
        table = oof_table(learner)
        if not store.has_table(table):
            raise MissingTable(f"table {table} is missing; `python cli.py stack` trains it")
        select.append(f"o{n}.pred_log AS {quote_ident(learner)}")
        joins.append(left_join(table, f"o{n}"))
    raw_tables: dict[str, str] = {}
    for feature in raw_features:
        table, _, column = feature.partition(".")
        if not column:
            raise ConfigError(f"stacking.raw_features: {feature!r}; expected 'table.column'")
        problem = feature_table_problem(table) or label_column_problem(column)
        if problem:  # the config refuses these at load; a config built in code meets them here
            raise ConfigError(f"stacking.raw_features: {problem}")
        if not store.has_table(table):
            raise MissingTable(f"stacking.raw_features names {feature!r}, but table {table} is not built")
        if column not in store.read_schema(table):
            raise ConfigError(f"stacking.raw_features names {feature!r}, but {table} has no column {column!r}")
        if table not in raw_tables:
            raw_tables[table] = f"r{len(raw_tables)}"
            joins.append(left_join(table, raw_tables[table]))
        select.append(f"{raw_tables[table]}.{quote_ident(column)}::DOUBLE AS {quote_ident(feature)}")
    store.verify_tables([ITEMS, FOLDS, *(oof_table(n) for n in learners), *raw_tables])
    return query_items(store, select, joins)


def stack_inputs(frame: pl.DataFrame, learners: list[str], raw_features: list[str], task_metric: str = "smape"
                 ) -> StackInputs:
    names = [*learners, *raw_features]
    return StackInputs(
        ids=frame["sample_id"].to_numpy(), fold=frame["fold"].to_numpy(),
        price=frame["price"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
        x=frame.select(pl.col(names).cast(pl.Float64)).to_numpy(), feature_names=names, n_base=len(learners),
        metric=task_metric)


def make_meta(name: str, params: dict[str, Any], n_base: int, seed: int, task_metric: str = "smape"
              ) -> MetaLearner:
    return meta_class(name)(params, n_base, seed, META_THREADS, task_metric)
