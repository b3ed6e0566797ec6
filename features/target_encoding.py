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

import numpy as np
import polars as pl

from featurestore.builders import BuildContext, Built, FeatureBuilder
from featurestore.errors import ConfigError
from featurestore.folds import fold_plan, items_with_folds


def encode_column(values: pl.Series, log_price: np.ndarray, fold: np.ndarray, smoothing: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Encodings and counts for every row; fold = -1 marks test rows.

    Sums are numpy's, in row order (`np.bincount`): polars' parallel group-by sums came out in a different order
    from run to run (two builds of Mercari's 5,000 rows differed in the last bits of 4,999 encodings)."""
    n = len(values)
    encoded = np.full(n, np.nan)
    counts = np.zeros(n, dtype=np.float64)
    test = np.flatnonzero(fold < 0)
    # Dense codes per distinct value, -1 for missing: the same for every fold.
    code = values.cast(pl.String).rank("dense").fill_null(0).cast(pl.Int64).to_numpy() - 1
    width = int(code.max()) + 1 if n else 0
    plan = list(fold_plan(fold))
    if len(test):
        encoded[test] = 0.0
    for _, query, fitting_rows in plan:
        prior = float(np.mean(log_price[fitting_rows]))
        seen = fitting_rows[code[fitting_rows] >= 0]
        total_of = np.bincount(code[seen], weights=log_price[seen], minlength=width)
        n_of = np.bincount(code[seen], minlength=width).astype(np.float64)
        for rows, is_test in ((query, False), (test, True)):
            if not len(rows):
                continue
            known = code[rows] >= 0
            n_seen = np.where(known, n_of[np.maximum(code[rows], 0)], 0.0)
            total = np.where(known, total_of[np.maximum(code[rows], 0)], 0.0)
            value = (total + smoothing * prior) / (n_seen + smoothing)
            if is_test:  # the mean over folds of what each fold's fitting rows say (same distribution as OOF)
                encoded[rows] += value / len(plan)
                counts[rows] += n_seen / len(plan)
            else:
                encoded[rows], counts[rows] = value, n_seen
    return encoded, counts


class TargetEncodingBuilder(FeatureBuilder):
    table = "target_enc"
    version = "2"
    inputs = ("items", "folds", "catalog")
    reads = ("target_encoding",)

    def build(self, ctx: BuildContext) -> Built:
        cfg = self.config.target_encoding
        catalog = ctx.store.read("catalog")
        missing = [c for c in cfg.columns if c not in catalog.columns]
        if missing:
            raise ConfigError(f"target_encoding.columns: {missing} are not columns of the catalog table "
                             f"(it has: {', '.join(catalog.columns)})")
        frame = (items_with_folds(ctx.store, ["sample_id", "price"])
                 .join(catalog.select(["sample_id", *cfg.columns]), on="sample_id", how="left"))
        log_price = np.log1p(frame["price"].to_numpy())
        fold = frame["fold"].to_numpy()
        out = frame.select("sample_id")
        for column in cfg.columns:
            values = frame[column].cast(pl.String)
            encoded, counts = encode_column(values, log_price, fold, cfg.smoothing)
            out = out.with_columns(pl.Series(f"te_{column}", encoded), pl.Series(f"te_{column}_count", counts))
        return Built(out)
