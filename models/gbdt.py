"""LightGBM, XGBoost and CatBoost learners. Saved as LightGBM text, XGBoost JSON and CatBoost cbm.

All three fit the same matrix with the same robust objective choice ("huber", "l1", "l2" on the log target),
a fixed seed and early stopping on the watch slice. Only LightGBM is told which columns are categories; XGBoost
and CatBoost read the category codes as numbers (brand-like columns reach them through `target_enc`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import catboost
import lightgbm as lgb
import numpy as np
import xgboost as xgb

from models.base import BaseLearner, Inputs, check_objective, save_atomic, threads

# Huber's delta in log-price units: residuals beyond ~1 (a factor of e) count linearly, like SMAPE's bounded loss.
HUBER_DELTA = 1.0


class LightGBMLearner(BaseLearner):
    name = "lgbm"
    file_pattern = "fold{fold}.lgbm.txt"

    def _params(self) -> dict[str, Any]:
        cfg = self.config.models.lgbm
        objective = {"huber": "huber", "l1": "regression_l1", "l2": "regression"}[check_objective("lgbm",
                                                                                                  cfg.objective)]
        params = {"objective": objective, "alpha": HUBER_DELTA, "learning_rate": cfg.learning_rate,
                  "num_leaves": 31, "min_data_in_leaf": 20, "feature_fraction": 0.8, "bagging_fraction": 0.8,
                  "bagging_freq": 1, "lambda_l2": 1.0, "seed": self.seed, "deterministic": True,
                  "force_row_wise": True, "num_threads": threads(self.config), "verbosity": -1}
        params.update(cfg.params)
        return params

    def recorded_params(self) -> dict[str, Any]:
        return {k: v for k, v in self._params().items() if k != "num_threads"}

    def fit(self, train: Inputs, y: np.ndarray, watch: Inputs, y_watch: np.ndarray) -> None:
        cfg = self.config.models.lgbm
        params = self._params()
        dtrain = lgb.Dataset(train.dense, y, feature_name=_safe_names(self.feature_names),
                             categorical_feature=self.categorical or "auto", free_raw_data=True)
        dwatch = lgb.Dataset(watch.dense, y_watch, reference=dtrain)
        self.model = lgb.train(params, dtrain, num_boost_round=cfg.rounds, valid_sets=[dwatch],
                               callbacks=[lgb.early_stopping(cfg.early_stopping_rounds, verbose=False)])
        self.best_iteration = self.model.best_iteration

    def predict(self, x: Inputs) -> np.ndarray:
        return self.model.predict(x.dense, num_iteration=self.model.best_iteration or None)

    def save(self, path: Path) -> None:
        save_atomic(path, lambda tmp: self.model.save_model(str(tmp), num_iteration=self.model.best_iteration or None))

    def load(self, path: Path) -> None:
        self.model = lgb.Booster(model_file=str(path))

    def importance(self) -> dict[str, float]:
        gains = self.model.feature_importance(importance_type="gain")
        return dict(zip(self.feature_names, map(float, gains), strict=True))


class XGBoostLearner(BaseLearner):
    name = "xgb"
    file_pattern = "fold{fold}.xgb.json"

    def _params(self) -> dict[str, Any]:
        cfg = self.config.models.xgb
        objective = {"huber": "reg:pseudohubererror", "l1": "reg:absoluteerror",
                     "l2": "reg:squarederror"}[check_objective("xgb", cfg.objective)]
        params = {"objective": objective, "huber_slope": HUBER_DELTA, "eta": cfg.learning_rate, "max_depth": 6,
                  "min_child_weight": 5, "subsample": 0.8, "colsample_bytree": 0.8, "lambda": 1.0,
                  "tree_method": "hist", "seed": self.seed, "nthread": threads(self.config)}
        params.update(self.config.models.xgb.params)
        return params

    def recorded_params(self) -> dict[str, Any]:
        return {k: v for k, v in self._params().items() if k != "nthread"}

    def fit(self, train: Inputs, y: np.ndarray, watch: Inputs, y_watch: np.ndarray) -> None:
        cfg = self.config.models.xgb
        names = _safe_names(self.feature_names)
        dtrain = xgb.DMatrix(train.dense, label=y, feature_names=names)
        dwatch = xgb.DMatrix(watch.dense, label=y_watch, feature_names=names)
        # Start from the median: pseudo-Huber's Newton steps are tiny far from the target, so from XGBoost's
        # default start the first trees barely move and early stopping quits at round 1.
        params = {"base_score": float(np.median(y)), **self._params()}
        self.model = xgb.train(params, dtrain, num_boost_round=cfg.rounds, evals=[(dwatch, "watch")],
                               early_stopping_rounds=cfg.early_stopping_rounds, verbose_eval=False)
        self.best_iteration = int(self.model.best_iteration) + 1
        # Keep only the trees up to the best round, so the saved model predicts what was validated.
        self.model = self.model[: self.best_iteration]

    def predict(self, x: Inputs) -> np.ndarray:
        return self.model.predict(xgb.DMatrix(x.dense, feature_names=_safe_names(self.feature_names)))

    def save(self, path: Path) -> None:
        save_atomic(path, lambda tmp: self.model.save_model(str(tmp)))

    def load(self, path: Path) -> None:
        self.model = xgb.Booster()
        self.model.load_model(str(path))
        self.model.set_param({"nthread": threads(self.config)})

    def importance(self) -> dict[str, float]:
        scores = self.model.get_score(importance_type="total_gain")
        by_safe = dict(zip(_safe_names(self.feature_names), self.feature_names, strict=True))
        return {by_safe[k]: float(v) for k, v in scores.items()}


class CatBoostLearner(BaseLearner):
    name = "catboost"
    file_pattern = "fold{fold}.cbm"

    def _params(self) -> dict[str, Any]:
        cfg = self.config.models.catboost
        loss = {"huber": f"Huber:delta={HUBER_DELTA}", "l1": "MAE", "l2": "RMSE"}[check_objective("catboost",
                                                                                                   cfg.objective)]
        params = {"loss_function": loss, "iterations": cfg.rounds, "learning_rate": cfg.learning_rate, "depth": 6,
                  "l2_leaf_reg": 3.0, "random_seed": self.seed, "thread_count": threads(self.config),
                  "od_type": "Iter", "od_wait": cfg.early_stopping_rounds, "use_best_model": True,
                  "allow_writing_files": False, "verbose": False}
        params.update(cfg.params)
        return params

    def recorded_params(self) -> dict[str, Any]:
        return {k: v for k, v in self._params().items() if k != "thread_count"}

    def fit(self, train: Inputs, y: np.ndarray, watch: Inputs, y_watch: np.ndarray) -> None:
        # CatBoost cannot boost Huber from the average, and from 0 a log-price target (~3) takes all the rounds
        # to reach: start both pools at the median, then store the median as the model's bias (inside the cbm).
        start = float(np.median(y))
        self.model = catboost.CatBoostRegressor(**self._params())
        self.model.fit(catboost.Pool(train.dense, y, baseline=np.full(len(y), start)),
                       eval_set=catboost.Pool(watch.dense, y_watch, baseline=np.full(len(y_watch), start)))
        scale, bias = self.model.get_scale_and_bias()
        self.model.set_scale_and_bias(scale, bias + start)
        self.best_iteration = int(self.model.get_best_iteration() or 0) + 1

    def predict(self, x: Inputs) -> np.ndarray:
        return self.model.predict(x.dense, thread_count=threads(self.config))

    def save(self, path: Path) -> None:
        save_atomic(path, lambda tmp: self.model.save_model(str(tmp), format="cbm"))

    def load(self, path: Path) -> None:
        self.model = catboost.CatBoostRegressor()
        self.model.load_model(str(path), format="cbm")

    def importance(self) -> dict[str, float]:
        values = self.model.get_feature_importance()
        return dict(zip(self.feature_names, map(float, values), strict=True))


def _safe_names(names: list[str]) -> list[str]:
    """LightGBM and XGBoost refuse some characters in feature names ('[', ']', '<', ',', ':', '"')."""
    table = str.maketrans({c: "_" for c in '[]<>,:"{}'})
    return [n.translate(table) for n in names]
