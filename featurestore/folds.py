"""The one fold plan every out-of-fold computation follows (target encoding, kNN, learners, the stack).

`fold = -1` marks test rows. For each training fold k the plan yields (k, rows of fold k, rows of the other
folds); test rows are predicted or encoded once per fold from that fold's fitting rows and averaged, so a test row's
features have the same distribution as a training row's out-of-fold features (both see (k-1)/k of the labels).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import polars as pl

from featurestore.names import FOLDS, ITEMS
from featurestore.store import FeatureStore


def fold_plan(fold: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(k, query rows = fold k, fitting rows = training rows outside fold k), folds in ascending order."""
    train = fold >= 0
    for k in sorted(set(fold[train].tolist())):
        yield k, np.flatnonzero(fold == k), np.flatnonzero(train & (fold != k))


def n_folds(fold: np.ndarray) -> int:
    return len(set(fold[fold >= 0].tolist()))


def items_with_folds(store: FeatureStore, columns: list[str]) -> pl.DataFrame:
    """`columns` of items (sample_id among them) with the fold plan, ordered by sample_id; `fold = -1` on test
    rows. The one Python spelling of the items ⋈ folds join (models.matrix has its SQL twin)."""
    return (store.read(ITEMS, columns=columns).sort("sample_id")
            .join(store.read(FOLDS), on="sample_id", how="left").with_columns(pl.col("fold").fill_null(-1)))


class FoldMean:
    """Test rows' values: the mean over folds of what each fold's fitting rows (or model) give them, NaN-safe (a
    fold that could not compute a value does not count). Summed in fold order, then divided once: every caller
    gets the same bits for the same per-fold values."""

    def __init__(self, n: int) -> None:
        self.total = np.zeros(n)
        self.seen = np.zeros(n, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        self.total = self.total + np.nan_to_num(values, nan=0.0)
        self.seen = self.seen + ~np.isnan(values)

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.seen > 0, self.total / self.seen, np.nan)
