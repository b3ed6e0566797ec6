"""`target_enc`: out-of-fold target encoding of catalog columns (brand, unit, ...).

For each encoded column: `te_<column>` is the smoothed mean log1p(price) of rows sharing the value, and
`te_<column>_count` how many such rows there were. Training rows of fold k are encoded from the other folds only
(the shared `folds` table): changing fold k's prices never changes fold k's encodings, and a row never counts
itself. Test rows are encoded once per fold from that fold's fitting rows and averaged, so their encodings and
counts have the distribution the learners saw in training (encoding them from all training rows made brand
counts ~1.24x larger on test rows than on training rows). Missing values and values unseen by the fitting rows
get the prior (the fitting rows' mean) and count 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from featurestore.builders import BuildContext, Built, FeatureBuilder, OnlineRows
from featurestore.errors import ConfigError
from featurestore.folds import fold_plan, items_with_folds
from featurestore.store import FeatureStore


@dataclass
class FoldSums:
    """What one fold's fitting rows say about each value (dense code): the sum and count of their log prices,
    and their mean log price (the prior)."""

    prior: float
    total: np.ndarray
    count: np.ndarray

    def encode(self, code: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
        """Smoothed encodings and counts of rows with these codes (-1, or a code without fitting rows: the
        prior and count 0)."""
        known = (code >= 0) & (code < len(self.total))
        n_seen = np.where(known, self.count[np.clip(code, 0, max(len(self.count) - 1, 0))], 0.0)
        total = np.where(known, self.total[np.clip(code, 0, max(len(self.total) - 1, 0))], 0.0)
        return (total + smoothing * self.prior) / (n_seen + smoothing), n_seen


def fold_sums(code: np.ndarray, log_price: np.ndarray, fitting_rows: np.ndarray, width: int) -> FoldSums:
    """Sums are numpy's, in row order (`np.bincount`): polars' parallel group-by sums came out in a different order
    from run to run (two builds of Mercari's 5,000 rows differed in the last bits of 4,999 encodings)."""
    seen = fitting_rows[code[fitting_rows] >= 0]
    return FoldSums(float(np.mean(log_price[fitting_rows])),
                    np.bincount(code[seen], weights=log_price[seen], minlength=width),
                    np.bincount(code[seen], minlength=width).astype(np.float64))


def dense_codes(values: pl.Series) -> np.ndarray:
    """Dense codes per distinct value, -1 for missing: the same for every fold."""
    return values.cast(pl.String).rank("dense").fill_null(0).cast(pl.Int64).to_numpy() - 1


def mean_over_folds(sums: list[FoldSums], code: np.ndarray, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
    """A test row's encoding and count: the mean over folds of what each fold's fitting rows say (the same
    distribution as the out-of-fold values the learners trained on), added in fold order."""
    encoded, counts = np.zeros(len(code)), np.zeros(len(code))
    for fold in sums:
        value, n_seen = fold.encode(code, smoothing)
        encoded += value / len(sums)
        counts += n_seen / len(sums)
    return encoded, counts


def encode_column(values: pl.Series, log_price: np.ndarray, fold: np.ndarray, smoothing: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Encodings and counts for every row; fold = -1 marks test rows."""
    n = len(values)
    encoded = np.full(n, np.nan)
    counts = np.zeros(n, dtype=np.float64)
    test = np.flatnonzero(fold < 0)
    code = dense_codes(values)
    width = int(code.max()) + 1 if n else 0
    plan = list(fold_plan(fold))
    sums = [fold_sums(code, log_price, fitting_rows, width) for _, _, fitting_rows in plan]
    for (_, query, _), fold_sum in zip(plan, sums, strict=True):
        if len(query):
            encoded[query], counts[query] = fold_sum.encode(code[query], smoothing)
    if len(test):
        encoded[test], counts[test] = mean_over_folds(sums, code[test], smoothing)
    return encoded, counts


class TargetEncodingBuilder(FeatureBuilder):
    table = "target_enc"
    version = "2"
    inputs = ("items", "folds", "catalog")
    reads = ("target_encoding",)

    def build(self, ctx: BuildContext) -> Built:
        return Built(self._encode(self._frame(ctx.store)))

    def _frame(self, store: FeatureStore) -> pl.DataFrame:
        """Every item's id, price, fold (-1: test) and encoded columns, ordered by sample_id."""
        columns = self.config.target_encoding.columns
        catalog = store.read("catalog")
        missing = [c for c in columns if c not in catalog.columns]
        if missing:
            raise ConfigError(f"target_encoding.columns: {missing} are not columns of the catalog table "
                             f"(it has: {', '.join(catalog.columns)})")
        return (items_with_folds(store, ["sample_id", "price"])
                .join(catalog.select(["sample_id", *columns]), on="sample_id", how="left"))

    def _encode(self, frame: pl.DataFrame) -> pl.DataFrame:
        cfg = self.config.target_encoding
        log_price = np.log1p(frame["price"].to_numpy())
        fold = frame["fold"].to_numpy()
        out = frame.select("sample_id")
        for column in cfg.columns:
            values = frame[column].cast(pl.String)
            encoded, counts = encode_column(values, log_price, fold, cfg.smoothing)
            out = out.with_columns(pl.Series(f"te_{column}", encoded), pl.Series(f"te_{column}_count", counts))
        return out

    supports_online = True

    def online_state(self, trained: FeatureStore, threads: int) -> dict[str, tuple[dict[str, int], list[FoldSums]]]:
        """Per encoded column: each training value's dense code and every fold's sums over its fitting rows (the
        training rows in sample_id order, as `build` sums them: the same bits)."""
        frame = self._frame(trained).filter(pl.col("fold") >= 0)
        log_price, fold = np.log1p(frame["price"].to_numpy()), frame["fold"].to_numpy()
        state = {}
        for column in self.config.target_encoding.columns:
            values = frame[column].cast(pl.String)
            code = dense_codes(values)
            width = int(code.max()) + 1 if len(code) else 0
            lookup = dict(zip(values.to_list(), code.tolist(), strict=True))
            lookup.pop(None, None)  # type: ignore[call-overload]
            state[column] = (lookup, [fold_sums(code, log_price, rows, width) for _, _, rows in fold_plan(fold)])
        return state

    def online(self, state: dict[str, tuple[dict[str, int], list[FoldSums]]], rows: OnlineRows) -> pl.DataFrame:
        """A new row reads only the training rows' sums: a value they never hold gets the prior, count 0."""
        catalog = rows.tables["catalog"]
        out = catalog.select("sample_id")
        smoothing = self.config.target_encoding.smoothing
        for column, (lookup, sums) in state.items():
            code = np.array([-1 if v is None else lookup.get(v, -1) for v in catalog[column].cast(pl.String)],
                            dtype=np.int64)
            encoded, counts = mean_over_folds(sums, code, smoothing)
            out = out.with_columns(pl.Series(f"te_{column}", encoded), pl.Series(f"te_{column}_count", counts))
        return out
