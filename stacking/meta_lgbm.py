"""A small LightGBM meta over the base predictions and raw features; its round count is read off held-out curves."""

from __future__ import annotations

from typing import Any

import lightgbm as lgb
import numpy as np
import optuna

from stacking.meta import MetaLearner, register_meta


@register_meta
class LightGBMMeta(MetaLearner):
    """A small LightGBM on the base predictions and raw features. Its round count is not searched: each fit
    runs up to `max_rounds` and records the held-out L1 curve; the stack reads the best round off the mean curve
    (one fit per fold instead of one per round count)."""

    name = "lgbm"
    complexity = 3
    candidate_weight = 1
    curve_param = "rounds"
    max_rounds = 150
    # ~6-10 strong columns need no more rows than this; the cost of a fit grows with them (Mercari: 35k).
    max_fit_rows = 20_000
    # A fit with held-out sets stops once their summed L1 has not improved for this many rounds; the stack then
    # reads the best round off the curves' common prefix (with high rates and binning once, a candidate's 15
    # fits went from 8.6 s to ~3 s on Mercari).
    patience = 15

    @staticmethod
    def suggest(trial: optuna.Trial) -> dict[str, Any]:
        # Small trees on ~6-10 strong columns; each candidate is fitted 15 times, so every round counts.
        return {"num_leaves": trial.suggest_int("lgbm_num_leaves", 4, 15, log=True),
                # High rates: ~6 strong columns need few rounds, and each candidate is fitted 15 times.
                "learning_rate": trial.suggest_float("lgbm_learning_rate", 0.1, 0.3, log=True),
                "min_data_in_leaf": trial.suggest_int("lgbm_min_data_in_leaf", 20, 400, log=True),
                "lambda_l2": trial.suggest_float("lgbm_lambda_l2", 1e-3, 10.0, log=True),
                "objective": trial.suggest_categorical("lgbm_objective", ["huber", "regression_l1"])}

    def _train_params(self) -> dict[str, Any]:
        p = self.params
        return {"objective": p["objective"], "alpha": 1.0, "num_leaves": p["num_leaves"],
                  "learning_rate": p["learning_rate"], "min_data_in_leaf": p["min_data_in_leaf"],
                  "lambda_l2": p["lambda_l2"], "seed": self.seed, "deterministic": True, "force_row_wise": True,
                  "bagging_fraction": 0.5, "bagging_freq": 1, "max_bin": 63, "num_threads": self.threads,
                  "verbosity": -1, "metric": "l1", "feature_pre_filter": False}

    def _fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        data = lgb.Dataset(x, y, params=DATASET_PARAMS, free_raw_data=True)
        return self._train(data, [lgb.Dataset(vx, vy, reference=data) for vx, vy in (valid or [])])

    def fit_rows(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray, valid: list[np.ndarray] | None = None,
                 weight: np.ndarray | None = None) -> MetaLearner:
        """Subsets of one binned Dataset of the whole matrix: binning (feature values only, no labels) happens
        once per matrix instead of once per fit; 15 fits per candidate made it a third of the cost. Fits use at
        most `max_fit_rows` rows, a seeded subsample drawn without looking at labels."""
        full = _binned(x, y, weight)
        rows = np.sort(rows)
        if len(rows) > self.max_fit_rows:
            rows = np.sort(np.random.default_rng(self.seed).choice(rows, self.max_fit_rows, replace=False))
        return self._train(full.subset(rows), [full.subset(np.sort(v)) for v in (valid or [])])

    def _train(self, data: lgb.Dataset, sets: list[lgb.Dataset]) -> MetaLearner:
        params = self._train_params()
        history: dict[str, Any] = {}
        rounds = int(self.params.get("rounds", self.max_rounds))
        callbacks = [lgb.record_evaluation(history), _stop_on_summed_curve(self.patience)] if sets else None
        self.model = lgb.train(params, data, num_boost_round=rounds, valid_sets=sets or None,
                               valid_names=[f"v{i}" for i in range(len(sets))] or None, callbacks=callbacks)
        self.curves_ = [np.asarray(history[f"v{i}"]["l1"]) for i in range(len(sets))]
        self.fitted_ = True  # fit_rows trains here directly
        return self

    def _predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        return self.model.predict(x, num_iteration=at, num_threads=self.threads)

    def _state(self) -> dict[str, Any]:
        return {"model": self.model.model_to_string()}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.model = lgb.Booster(model_str=state["model"])


DATASET_PARAMS = {"max_bin": 63, "feature_pre_filter": False, "verbosity": -1}
_BINNED: dict[tuple[int, tuple[int, ...]], tuple[np.ndarray, lgb.Dataset]] = {}


def _binned(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None = None) -> lgb.Dataset:
    """One binned Dataset per meta matrix and process (rows without a label get 0: they are never in a fit)."""
    key = (id(x), x.shape)
    if key not in _BINNED or _BINNED[key][0] is not x:
        _BINNED.clear()
        w = None if weight is None else np.nan_to_num(weight, nan=0.0)
        full = lgb.Dataset(x, np.nan_to_num(y, nan=0.0), weight=w, params=DATASET_PARAMS,
                           free_raw_data=False).construct()
        _BINNED[key] = (x, full)
    return _BINNED[key][1]


def _stop_on_summed_curve(patience: int) -> Any:
    """LightGBM callback: stop when the sum of the held-out L1 values has not improved for `patience` rounds
    (LightGBM's own early stopping stops as soon as *any* one set stagnates)."""
    best = {"value": np.inf, "round": 0}

    def callback(env: Any) -> None:
        value = sum(item[2] for item in env.evaluation_result_list)
        if value < best["value"]:
            best.update(value=value, round=env.iteration)
        elif env.iteration - best["round"] >= patience:
            raise lgb.callback.EarlyStopException(best["round"], env.evaluation_result_list)

    callback.order = 30  # after record_evaluation (order 20), so the stopping round is recorded too
    return callback
