"""LightGBM, XGBoost and CatBoost learners. Saved as LightGBM text, XGBoost JSON and CatBoost cbm.

All three fit the same matrix with the same robust objective choice ("huber", "l1", "l2" on the log target),
a fixed seed and early stopping on the watch slice. Only LightGBM is told which columns are categories; XGBoost
and CatBoost read the category codes as numbers (brand-like columns reach them through `target_enc`).
LightGBM and XGBoost also read sparse tables (text_sparse) as CSR beside the dense columns; CatBoost does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import catboost
import lightgbm as lgb
import numpy as np
import xgboost as xgb

from featurestore.config import at_least, positive
from featurestore.store import atomic_write
from models.base import BaseLearner, Inputs, LearnerSettings, WithObjective, check_objective
from models.metrics import HUBER_DELTA, weighted_median
from models.registry import register

GBDT_TABLES = ["catalog", "target_enc", "knn__text_minilm", "knn__text_mpnet", "knn__image_resnet", "knn__concat"]


@dataclass
class GbdtSettings(WithObjective):
    """`[models.lgbm]`, `[models.xgb]`, `[models.catboost]`, `[models.lgbm_text]`."""

    tables: list[str] = field(default_factory=lambda: list(GBDT_TABLES))
    rounds: int = at_least(2000, 1)
    learning_rate: float = positive(0.05)
    early_stopping_rounds: int = at_least(100, 1)
    # Extra library parameters passed as is (e.g. {num_leaves = 63} for LightGBM).
    params: dict[str, Any] = field(default_factory=dict)
    # Sparse tables in `tables`: keep this many columns (most frequent terms in the training rows); 0 = all.
    max_sparse_columns: int = 0


@dataclass
class LightGBMSettings(GbdtSettings):
    """`[models.lgbm]`, `[models.lgbm_text]`: the GBDT settings and LightGBM's own."""

    # Histogram bins of each sparse column (LightGBM's `max_bin_by_feature`); 0 = `max_bin` like the dense ones.
    # Split finding scans every bin of every sampled column at every leaf, so 8,000 TF-IDF columns at 255 bins
    # cost most of a Mercari tree; a term's weight carries little beyond its presence and rough size.
    sparse_max_bin: int = at_least(0, 0)


class _Gbdt(BaseLearner):
    settings_type = GbdtSettings
    # The library's thread-count parameter: left out of the recorded parameters (it changes speed, not the model).
    threads_param: ClassVar[str]

    def _params(self) -> dict[str, Any]:
        raise NotImplementedError

    def recorded_params(self) -> dict[str, Any]:
        return {k: v for k, v in self._params().items() if k != self.threads_param}

    @classmethod
    def sparse_column_cap(cls, settings: LearnerSettings) -> int:
        assert isinstance(settings, GbdtSettings)
        return settings.max_sparse_columns


def _start(y: np.ndarray, weight: np.ndarray | None) -> float:
    """Where boosting starts: the (weighted) median of the target, the L1/Huber optimum of a constant. With MAPE's
    1/y weights that is the weighted median, far below the plain one on a skewed target."""
    return float(np.median(y)) if weight is None else weighted_median(y, weight)


@register
class LightGBMLearner(_Gbdt):
    name = "lgbm"
    file_pattern = "fold{fold}.lgbm.txt"
    reads_sparse = True
    supports_weights = True
    settings_type = LightGBMSettings

    def _params(self) -> dict[str, Any]:
        cfg = self.settings
        objective = {"huber": "huber", "l1": "regression_l1", "l2": "regression"}[check_objective(self.name,
                                                                                                  cfg.objective)]
        params = {"objective": objective, "alpha": HUBER_DELTA, "learning_rate": cfg.learning_rate,
                  "num_leaves": 31, "min_data_in_leaf": 20, "feature_fraction": 0.8, "bagging_fraction": 0.8,
                  "bagging_freq": 1, "lambda_l2": 1.0, "seed": self.seed, "deterministic": True,
                  "force_row_wise": True, "num_threads": self.threads, "verbosity": -1}
        params.update(cfg.params)
        return params

    threads_param = "num_threads"

    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        assert watch is not None
        cfg = self.settings
        assert isinstance(cfg, LightGBMSettings)
        params = self._params()
        if cfg.sparse_max_bin and train.sparse is not None:
            dense_bins = int(params.get("max_bin", 255))
            params["max_bin_by_feature"] = ([dense_bins] * train.dense.shape[1]
                                            + [cfg.sparse_max_bin] * train.sparse.shape[1])
        dtrain = lgb.Dataset(train.combined(), y, weight=train.weight, feature_name=_safe_names(self.feature_names),
                             categorical_feature=self.categorical or "auto", free_raw_data=True)
        dwatch = lgb.Dataset(watch.combined(), y_watch, weight=watch.weight, reference=dtrain)
        self.model_ = lgb.train(params, dtrain, num_boost_round=cfg.rounds, valid_sets=[dwatch],
                                callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)])
        self.best_iteration_ = self.model_.best_iteration

    def _predict(self, x: Inputs) -> np.ndarray:
        return self.model_.predict(x.combined(), num_iteration=self.model_.best_iteration or None,
                                   num_threads=self.threads)

    def _save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: self.model_.save_model(str(tmp),
                                                              num_iteration=self.model_.best_iteration or None))

    def _load(self, path: Path) -> None:
        self.model_ = lgb.Booster(model_file=str(path))

    def _importance(self) -> dict[str, float]:
        gains = self.model_.feature_importance(importance_type="gain")
        return dict(zip(self.feature_names, map(float, gains), strict=True))


@register
class LightGBMTextLearner(LightGBMLearner):
    """LightGBM over dense tables + text_sparse: its own settings section, so it stacks beside `lgbm`."""

    name = "lgbm_text"
    file_pattern = "fold{fold}.lgbm.txt"

    @classmethod
    def default_settings(cls) -> LearnerSettings:
        return LightGBMSettings(tables=[*GBDT_TABLES, "text_sparse"], learning_rate=0.1, early_stopping_rounds=50,
                                max_sparse_columns=20_000,
                                params={"num_leaves": 63, "feature_fraction": 0.5, "min_data_in_leaf": 10})


@register
class XGBoostLearner(_Gbdt):
    name = "xgb"
    file_pattern = "fold{fold}.xgb.json"
    reads_sparse = True
    supports_weights = True

    def _params(self) -> dict[str, Any]:
        cfg = self.settings
        objective = {"huber": "reg:pseudohubererror", "l1": "reg:absoluteerror",
                     "l2": "reg:squarederror"}[check_objective(self.name, cfg.objective)]
        params = {"objective": objective, "huber_slope": HUBER_DELTA, "eta": cfg.learning_rate, "max_depth": 6,
                  "min_child_weight": 5, "subsample": 0.8, "colsample_bytree": 0.8, "lambda": 1.0,
                  "tree_method": "hist", "seed": self.seed, "nthread": self.threads}
        params.update(cfg.params)
        return params

    threads_param = "nthread"

    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        assert watch is not None
        cfg = self.settings
        names = _safe_names(self.feature_names)
        dtrain = xgb.DMatrix(train.combined(), label=y, weight=train.weight, feature_names=names, missing=np.nan)
        dwatch = xgb.DMatrix(watch.combined(), label=y_watch, weight=watch.weight, feature_names=names,
                             missing=np.nan)
        # Start from the median: pseudo-Huber's Newton steps are tiny far from the target, so from XGBoost's
        # default start the first trees barely move and early stopping quits at round 1.
        params = {"base_score": _start(y, train.weight), **self._params()}
        model = xgb.train(params, dtrain, num_boost_round=cfg.rounds, evals=[(dwatch, "watch")],
                          early_stopping_rounds=cfg.early_stopping_rounds, verbose_eval=False)
        self.best_iteration_ = int(model.best_iteration) + 1
        # Keep only the trees up to the best round, so the saved model predicts what was validated.
        self.model_ = model[: self.best_iteration_]

    def _predict(self, x: Inputs) -> np.ndarray:
        # In place (no DMatrix, no names): the same trees and values; a DMatrix per call was most of a one-row
        # prediction's cost. The columns are the spec's, in the order they were trained on.
        return self.model_.inplace_predict(x.combined(), missing=np.nan, validate_features=False)

    def _save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: self.model_.save_model(str(tmp)))

    def _load(self, path: Path) -> None:
        self.model_ = xgb.Booster()
        self.model_.load_model(str(path))
        self.model_.set_param({"nthread": self.threads})

    def _importance(self) -> dict[str, float]:
        scores = self.model_.get_score(importance_type="total_gain")
        by_safe = dict(zip(_safe_names(self.feature_names), self.feature_names, strict=True))
        return {by_safe[k]: float(v) for k, v in scores.items()}


@register
class CatBoostLearner(_Gbdt):
    name = "catboost"
    file_pattern = "fold{fold}.cbm"
    supports_weights = True

    @classmethod
    def default_settings(cls) -> LearnerSettings:
        return GbdtSettings(rounds=1500, learning_rate=0.08)

    def _params(self) -> dict[str, Any]:
        cfg = self.settings
        loss = {"huber": f"Huber:delta={HUBER_DELTA}", "l1": "MAE", "l2": "RMSE"}[check_objective(self.name,
                                                                                                   cfg.objective)]
        params = {"loss_function": loss, "iterations": cfg.rounds, "learning_rate": cfg.learning_rate, "depth": 6,
                  "l2_leaf_reg": 3.0, "random_seed": self.seed, "thread_count": self.threads,
                  "od_type": "Iter", "od_wait": cfg.early_stopping_rounds, "use_best_model": True,
                  "allow_writing_files": False, "verbose": False}
        params.update(cfg.params)
        return params

    threads_param = "thread_count"

    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        assert watch is not None and y_watch is not None
        # CatBoost cannot boost Huber from the average, and from 0 a log-price target (~3) takes all the rounds
        # to reach: start both pools at the median, then store the median as the model's bias (inside the cbm).
        start = _start(y, train.weight)
        self.model_ = catboost.CatBoostRegressor(**self._params())
        self.model_.fit(catboost.Pool(train.dense, y, weight=train.weight, baseline=np.full(len(y), start)),
                        eval_set=catboost.Pool(watch.dense, y_watch, weight=watch.weight,
                                               baseline=np.full(len(y_watch), start)))
        scale, bias = self.model_.get_scale_and_bias()
        self.model_.set_scale_and_bias(scale, bias + start)
        self.best_iteration_ = int(self.model_.get_best_iteration() or 0) + 1

    def _predict(self, x: Inputs) -> np.ndarray:
        return self.model_.predict(x.dense, thread_count=self.threads)

    def _save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: self.model_.save_model(str(tmp), format="cbm"))

    def _load(self, path: Path) -> None:
        self.model_ = catboost.CatBoostRegressor()
        self.model_.load_model(str(path), format="cbm")

    def _importance(self) -> dict[str, float]:
        values = self.model_.get_feature_importance()
        return dict(zip(self.feature_names, map(float, values), strict=True))


def _safe_names(names: list[str]) -> list[str]:
    """LightGBM and XGBoost refuse some characters in feature names ('[', ']', '<', ',', ':', '"')."""
    table = str.maketrans({c: "_" for c in '[]<>,:"{}'})
    return [n.translate(table) for n in names]
