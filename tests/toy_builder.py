"""A plug-in out-of-fold feature builder kept outside features/, as a user would write one: one file, one
`[features.toy_len]` section, named in `features.plugins` and `builders`.

`toy_len`: the out-of-fold median log price of the training rows in the same text-length band (rows of fold k see
only the other folds' prices; test rows get the mean over folds). `tests/test_plugins.py` builds it through the
CLI and trains a learner on it; the builder contract test covers it without anyone listing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from featurestore.builders import BuildContext, Built, FeatureBuilder
from featurestore.config import at_least
from featurestore.folds import FoldMean, fold_plan, items_with_folds
from pipeline.registry import register_builder


@dataclass
class ToyLenSettings:
    bands: int = at_least(4, 2)  # quantile bands of log text length


@register_builder
class ToyLenBuilder(FeatureBuilder):
    name = "toy_len"
    table = "toy_len"
    inputs = ("items", "folds")
    settings_type = ToyLenSettings

    def build(self, ctx: BuildContext) -> Built:
        frame = items_with_folds(ctx.store, ["sample_id", "text", "price"])
        length = np.log1p(frame["text"].str.len_chars().to_numpy().astype(np.float64))
        edges = np.quantile(length, np.linspace(0, 1, self.settings.bands + 1)[1:-1])
        band = np.searchsorted(edges, length)
        log_price, fold = np.log1p(frame["price"].to_numpy()), frame["fold"].to_numpy()
        out, test, test_mean = np.full(frame.height, np.nan), np.flatnonzero(fold < 0), FoldMean(frame.height)
        for _, query, fitting in fold_plan(fold):
            medians = {b: float(np.median(log_price[fitting][band[fitting] == b]))
                       for b in np.unique(band[fitting])}
            lookup = np.array([medians.get(b, np.nan) for b in band])
            out[query] = lookup[query]
            test_mean.add(np.where(fold < 0, lookup, np.nan))
        out[test] = test_mean.mean()[test]
        return Built(frame.select("sample_id").with_columns(pl.Series("len_band_logp", out)))
