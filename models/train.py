"""Cross-fitting: each base learner writes `oof__<learner>` (train rows: out-of-fold prediction; test rows: the
mean of the fold models) and its fold models in native formats under `<store>/models/<learner>/<fingerprint>/`.

Leak rule: the model that predicts fold k is fitted on the other folds only, and its early stopping watches a
slice of those other folds (chosen by id hash), never fold k. So fold k's targets cannot move fold k's
predictions; `tests/test_models.py` checks this by permuting them.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from features.base import BuildContext, FeatureBuilder
from featurestore.config import Config
from featurestore.store import FeatureStore, Timer
from models.base import BaseLearner, Inputs
from models.matrix import MatrixSpec, fit_spec, load_frame, transform
from models.metrics import smape, to_price, to_target
from models.mlp import TfidfText
from models.registry import learner_class, learner_tables

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
TFIDF_FILE = "tfidf.json"


def watch_mask(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows whose id hashes below `fraction`: the early-stopping slice. By id, so it is the same slice whatever
    the row order, and deterministic across runs and machines."""
    hashed = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
                       for i in ids.tolist()], dtype=np.float64) / 2.0**64
    mask = hashed < fraction
    if not mask.any() and len(ids):
        mask[int(np.argmin(hashed))] = True
    return mask


@dataclass
class CrossFitResult:
    oof: np.ndarray  # model output (target space) for every row; NaN on test rows
    test: np.ndarray  # mean of the fold models' outputs on the test rows
    fold_smape: dict[int, float] = field(default_factory=dict)
    best_iterations: dict[int, int | None] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    importance: dict[str, float] = field(default_factory=dict)


def cross_fit(
    make: Callable[[int], BaseLearner], x: Inputs, price: np.ndarray, fold: np.ndarray, ids: np.ndarray,
    target: str, watch_fraction: float, seed: int, model_dir: Path, progress: bool = False,
) -> CrossFitResult:
    """Fit one model per fold (seed + fold), save it, reload it and predict with the reloaded file, so the
    pipeline's numbers come from exactly what `predict` will load."""
    is_test = fold < 0
    y = np.where(is_test, np.nan, to_target(np.nan_to_num(price, nan=1.0), target))
    folds = sorted(set(fold[~is_test].tolist()))
    oof = np.full(len(fold), np.nan)
    test_sum = np.zeros(int(is_test.sum()))
    watch = watch_mask(ids, watch_fraction, seed)
    result = CrossFitResult(oof=oof, test=test_sum)
    importance: dict[str, float] = {}
    for k in tqdm(folds, desc="folds", disable=not progress):
        fit_rows = ~is_test & (fold != k)
        watch_rows = np.flatnonzero(fit_rows & watch)
        train_rows = np.flatnonzero(fit_rows & ~watch)
        valid_rows = np.flatnonzero(fold == k)
        with Timer() as timer:
            learner = make(k)
            learner.fit(x.rows(train_rows), y[train_rows], x.rows(watch_rows), y[watch_rows])
            path = model_dir / learner.file_pattern.format(fold=k)
            learner.save(path)
            for name, gain in learner.importance().items():
                importance[name] = importance.get(name, 0.0) + gain / len(folds)
            loaded = make(k)
            loaded.load(path)
            oof[valid_rows] = loaded.predict(x.rows(valid_rows))
            if is_test.any():
                test_sum += loaded.predict(x.rows(np.flatnonzero(is_test)))
        result.fold_smape[k] = round(smape(price[valid_rows], to_price(oof[valid_rows], target)), 4)
        result.best_iterations[k] = learner.best_iteration
        result.seconds[k] = round(timer.seconds, 2)
    result.test = test_sum / max(1, len(folds))
    result.importance = importance
    return result


def model_dir_for(store: FeatureStore, learner: str, fingerprint: str) -> Path:
    return store.root / "models" / learner / fingerprint


class LearnerBuilder(FeatureBuilder):
    """Writes `oof__<learner>`; reused (not retrained) while its tables, settings and code are unchanged."""

    version = "1"
    extra_versions = ("lightgbm", "xgboost", "catboost", "torch", "scikit-learn")

    def __init__(self, config: Config, name: str) -> None:
        self.config = config
        self.name = name
        self.cls = learner_class(name)
        self.tables = learner_tables(config, name)
        self.table = f"oof__{name}"
        self.inputs = ("items", "folds", *self.tables)
        self._extra: dict[str, Any] = {}

    def _make(self, feature_names: list[str], categorical: list[int]) -> Callable[[int], BaseLearner]:
        return lambda k: self.cls(self.config, self.config.models.seed + k, feature_names, categorical)

    def params(self) -> dict[str, Any]:
        m = self.config.models
        return {"learner": self.name, "target": m.target, "seed": m.seed, "max_categories": m.max_categories,
                "early_stopping_fraction": m.early_stopping_fraction,
                "settings": asdict(getattr(m, self.name)) if hasattr(m, self.name) else {}}

    def code_sources(self) -> tuple[object, ...]:
        import models.base
        import models.matrix
        import models.metrics

        return (type(self), self.cls, models.base, models.matrix, models.metrics)

    def artifacts_ok(self, store: FeatureStore, fingerprint: str) -> bool:
        return (model_dir_for(store, self.name, fingerprint) / SPEC_FILE).is_file()

    def build(self, ctx: BuildContext) -> pl.DataFrame:
        m = self.config.models
        model_dir = model_dir_for(ctx.store, self.name, ctx.fingerprint)
        # Models of older fingerprints belong to tables that are being replaced.
        for old in model_dir.parent.glob("*"):
            if old != model_dir:
                shutil.rmtree(old, ignore_errors=True)
        model_dir.mkdir(parents=True, exist_ok=True)
        probe = self.cls(self.config, m.seed, [], [])  # settings only: wants_text, recorded_params
        wants_text = probe.wants_text
        frame = load_frame(ctx.store, self.tables, with_text=wants_text)
        train = frame.filter(pl.col("split") == "train")
        spec = fit_spec(train, self.tables, m.max_categories)
        x = Inputs(transform(spec, frame))
        if wants_text:
            tfidf = TfidfText(m.mlp.tfidf_max_features)
            tfidf.fit(train["text"].to_list())
            tfidf.save(model_dir / TFIDF_FILE)
            x.sparse = tfidf.transform(frame["text"].to_list())
        fold = frame["fold"].to_numpy()
        price = frame["price"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        result = cross_fit(self._make(spec.feature_names, spec.categorical_indices), x, price, fold,
                           frame["sample_id"].to_numpy(), m.target, m.early_stopping_fraction, m.seed, model_dir,
                           progress=ctx.progress)
        spec.save(model_dir / SPEC_FILE)  # last: its presence marks a complete model folder
        output = np.where(fold >= 0, result.oof, np.nan)
        output[fold < 0] = result.test
        price_pred = to_price(output, m.target)
        train_rows = fold >= 0
        top = sorted(result.importance.items(), key=lambda kv: -kv[1])[:30]
        self._extra = {
            "model_dir": str(model_dir.relative_to(ctx.store.root)),
            "folds": sorted(result.fold_smape),
            "fold_smape": result.fold_smape,
            "oof_smape": round(smape(price[train_rows], price_pred[train_rows]), 4),
            "best_iterations": result.best_iterations,
            "fold_seconds": result.seconds,
            "objective": getattr(m, self.name).objective if hasattr(m, self.name) else None,
            "library_params": probe.recorded_params(),
            "n_features": len(spec.feature_names),
            "n_sparse_features": 0 if x.sparse is None else x.sparse.shape[1],
            "dropped_columns": spec.dropped,
            "importance_top": dict(top),
        }
        log.info("%s: OOF SMAPE %.2f (folds %s)", self.table, self._extra["oof_smape"], result.fold_smape)
        return frame.select("sample_id", "fold").with_columns(
            pl.Series("pred", output), pl.Series("pred_log", np.log1p(price_pred)), pl.Series("pred_price", price_pred))

    def manifest_extra(self, ctx: BuildContext, table: pl.DataFrame) -> dict[str, Any]:
        return self._extra


def predict_saved(features: FeatureStore, models: FeatureStore, config: Config, name: str) -> pl.DataFrame:
    """Test-row predictions of the stored fold models of `name` (trained in `models`) on the feature tables of
    `features`: the same matrix code, the same files, the same fold order and averaging as training."""
    info = models.info(f"oof__{name}")
    if info is None:
        raise FileNotFoundError(f"no trained '{name}' in {models.root}; run `python cli.py stack` first")
    model_dir = models.root / info.extra["model_dir"]
    spec = MatrixSpec.load(model_dir / SPEC_FILE)
    cls = learner_class(name)
    probe = cls(config, config.models.seed, spec.feature_names, spec.categorical_indices)
    frame = load_frame(features, spec.tables, with_text=probe.wants_text).filter(pl.col("split") == "test")
    x = Inputs(transform(spec, frame))
    if probe.wants_text:
        x.sparse = TfidfText.load(model_dir / TFIDF_FILE).transform(frame["text"].to_list())
    folds = info.extra["folds"]
    total = np.zeros(frame.height)
    for k in folds:
        learner = cls(config, config.models.seed + k, spec.feature_names, spec.categorical_indices)
        learner.load(model_dir / learner.file_pattern.format(fold=k))
        total += learner.predict(x)
    output = total / max(1, len(folds))
    price_pred = to_price(output, info.params["target"])
    return frame.select("sample_id").with_columns(
        pl.Series("pred", output), pl.Series("pred_log", np.log1p(price_pred)), pl.Series("pred_price", price_pred))


def learner_builders(config: Config, names: list[str] | None = None) -> list[LearnerBuilder]:
    return [LearnerBuilder(config, name) for name in (names or config.models.learners)]
