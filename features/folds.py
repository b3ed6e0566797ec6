"""The shared `folds` table: every out-of-fold computation (kNN prices, OOF predictions, stacking) uses it.

Stratified on quantile bands of log price so each fold sees the whole price range; grouped by the configured
group column (Mercari's seller_id) so near-duplicate listings of one seller never straddle train and validation.
Rows are sorted by id first, so the assignment does not depend on the order of the input file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from featurestore.builders import BuildContext, Built, FeatureBuilder, OnlineRows
from featurestore.errors import InputError


def price_bands(price: np.ndarray, n_bands: int) -> np.ndarray:
    log_price = np.log1p(price)
    edges = np.quantile(log_price, np.linspace(0, 1, n_bands + 1)[1:-1])
    return np.searchsorted(edges, log_price, side="right")


def assign_folds(
    sample_ids: np.ndarray, price: np.ndarray, groups: np.ndarray | None, k: int, seed: int, n_bands: int
) -> np.ndarray:
    if len(sample_ids) < k:
        raise InputError(f"folds.k={k} but only {len(sample_ids)} training rows; expected at least k rows")
    order = np.argsort(sample_ids, kind="stable")
    bands = price_bands(price[order], n_bands)
    fold = np.empty(len(sample_ids), dtype=np.int32)
    if groups is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(order)), bands)
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(order)), bands, groups[order])
    for fold_index, (_, valid) in enumerate(splits):
        fold[order[valid]] = fold_index
    return fold


class FoldsBuilder(FeatureBuilder):
    table = "folds"
    version = "1"
    inputs = ("items",)
    extra_versions = ("scikit-learn",)
    reads = ("folds", "columns.group")

    def build(self, ctx: BuildContext) -> Built:
        train = ctx.store.read("items", columns=["sample_id", "split", "price", "group_id"]).filter(
            pl.col("split") == "train"
        )
        groups = train["group_id"].to_numpy() if self.config.columns.group else None
        f = self.config.folds
        fold = assign_folds(train["sample_id"].to_numpy(), train["price"].to_numpy(), groups, f.k, f.seed,
                            f.price_bands)
        table = train.select("sample_id").with_columns(pl.Series("fold", fold, dtype=pl.Int32)).sort("sample_id")
        return Built(table, {"fold_sizes": table.group_by("fold").len().sort("fold")["len"].to_list()})

    supports_online = True

    def online(self, state: Any, rows: OnlineRows) -> pl.DataFrame:
        """New rows are test rows: in no fold (the table holds training rows only)."""
        return pl.DataFrame(schema={"sample_id": rows.tables["items"].schema["sample_id"], "fold": pl.Int32})
