"""Meta-learners: combine the base learners' log-price predictions (plus a few raw features) into one.

Each has an Optuna search space (`suggest`, its parameters prefixed by its name), fits on numpy arrays in
milliseconds (the stack fits each candidate 15 times), and saves itself as JSON (the LightGBM one embeds
LightGBM's own text model format), so a stored stack is never unpickled.

`mean` (the plain mean of the base predictions) and `single` (the base learner with the lowest SMAPE on the fit
rows) have no parameters: they are always candidates, so the nested CV can choose them when a fitted meta
overfits, and the stack is never worse than them by more than the noise of that choice.

Predictions are computed row by row (elementwise products summed per row, not BLAS matvec, whose blocking depends
on the row count): a row's prediction must not depend on its batch-mates, so `predict` on a few rows equals the
pipeline's own numbers bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import lightgbm as lgb
import numpy as np
import optuna
from scipy.optimize import minimize

from models.metrics import metric


class MetaLearner(ABC):
    name: ClassVar[str]
    # A parameter read off held-out curves instead of being searched (LightGBM's round count); None for others.
    curve_param: ClassVar[str | None] = None

    def __init__(self, params: dict[str, Any], n_base: int, seed: int, threads: int = 1, metric: str = "smape"
                 ) -> None:
        self.params = params
        self.n_base = n_base  # the first n_base columns are base-learner predictions (log1p price)
        self.seed = seed
        self.threads = threads
        self.metric = metric  # the task's metric (models.metrics): what `single` picks by
        # Row weights of the fit rows, from the metric (MAPE: 1/y); None = equal. Set by fit_rows.
        self.weight_: np.ndarray | None = None

    @staticmethod
    def suggest(trial: optuna.Trial) -> dict[str, Any]:
        return {}

    @abstractmethod
    def fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        """Fit; metas with a `curve_param` also record `curves_` (held-out L1 per round, one per valid set)."""

    def fit_rows(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray, valid: list[np.ndarray] | None = None,
                 weight: np.ndarray | None = None) -> MetaLearner:
        """Fit on `rows` of the whole meta matrix (the stack's calling convention; metas may cache per matrix).
        `weight`: row weights of the whole matrix, or None."""
        self.weight_ = None if weight is None else weight[rows]
        return self.fit(x[rows], y[rows], None if valid is None else [(x[v], y[v]) for v in valid])

    @abstractmethod
    def predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        """log1p-price predictions; `at` = the curve parameter's value (rounds) for metas that have one."""

    @abstractmethod
    def state(self) -> dict[str, Any]: ...

    @abstractmethod
    def set_state(self, state: dict[str, Any]) -> None: ...


def _rowdot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (x * w).sum(axis=1)


class MeanMeta(MetaLearner):
    """The plain mean of the base predictions in log space (a geometric mean of prices)."""

    name = "mean"

    def fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        return self

    def predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        return x[:, : self.n_base].mean(axis=1)

    def state(self) -> dict[str, Any]:
        return {}

    def set_state(self, state: dict[str, Any]) -> None:
        pass


class SingleMeta(MetaLearner):
    """The one base learner with the best score (the task's metric) on the fit rows."""

    name = "single"

    def fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        price = np.expm1(y)
        score = metric(self.metric).score
        scores = [score(price, np.expm1(x[:, i])) for i in range(self.n_base)]
        self.column_ = int(np.argmin(scores))
        return self

    def predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        return x[:, self.column_].copy()

    def state(self) -> dict[str, Any]:
        return {"column": self.column_}

    def set_state(self, state: dict[str, Any]) -> None:
        self.column_ = int(state["column"])


def _pseudo_huber(residual: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Loss and its derivative in the residual; ~L1 beyond delta, which suits SMAPE's median optimum."""
    root = np.sqrt(1.0 + (residual / delta) ** 2)
    return delta**2 * (root - 1.0), residual / root


class BlendMeta(MetaLearner):
    """Non-negative weights on the base predictions in log space (a weighted geometric mean of prices).

    convex = True: weights sum to 1 and there is no intercept; else any non-negative weights plus an intercept."""

    name = "blend"

    @staticmethod
    def suggest(trial: optuna.Trial) -> dict[str, Any]:
        return {"delta": trial.suggest_float("blend_delta", 0.05, 2.0, log=True),
                "convex": trial.suggest_categorical("blend_convex", [True, False])}

    def _weights(self, theta: np.ndarray) -> tuple[np.ndarray, float]:
        if self.params["convex"]:
            z = np.exp(theta - theta.max())
            return z / z.sum(), 0.0
        return theta[:-1], float(theta[-1])

    def fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        delta = float(self.params["delta"])
        convex = bool(self.params["convex"])
        rows = np.full(len(y), 1.0 / len(y)) if self.weight_ is None else self.weight_ / self.weight_.sum()
        # With a free intercept the columns are centred: base predictions all sit near the mean log price (~3 on
        # Mercari), so on raw columns the intercept and the weights move together and L-BFGS-B stalled after a
        # few steps on 7 correlated learners (a superset of learners then fitted *worse* in-sample than its
        # subset; 36.83 vs 36.63 CV SMAPE). Centred, the fit reaches the optimum (36.58). The weights keep their
        # meaning and the intercept is mapped back below. A convex blend has no intercept: nothing to decouple.
        centre = np.zeros(self.n_base) if convex else rows @ x[:, : self.n_base]
        base = np.ascontiguousarray(x[:, : self.n_base] - centre)

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = self._weights(theta)
            value, slope = _pseudo_huber(base @ w + b - y, delta)
            slope = slope * rows
            grad_w = base.T @ slope
            if convex:  # chain rule through the softmax
                return float(value @ rows), w * (grad_w - w @ grad_w)
            return float(value @ rows), np.append(grad_w, slope.sum())

        if convex:
            theta0, bounds = np.zeros(self.n_base), None
        else:
            theta0 = np.append(np.full(self.n_base, 1.0 / self.n_base), float(rows @ y))
            bounds = [(0.0, None)] * self.n_base + [(None, None)]
        result = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=bounds)
        self.weights, intercept = self._weights(result.x)
        self.intercept = intercept - float(centre @ self.weights)
        return self

    def predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        return _rowdot(x[:, : self.n_base], self.weights) + self.intercept

    def state(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "intercept": self.intercept}

    def set_state(self, state: dict[str, Any]) -> None:
        self.weights = np.asarray(state["weights"])
        self.intercept = float(state["intercept"])


class RidgeMeta(MetaLearner):
    """Ridge on standardised base predictions and raw features (missing values at the mean), solved in closed
    form: a p x p system for ~10 columns, so a fit costs one pass over the rows."""

    name = "ridge"

    @staticmethod
    def suggest(trial: optuna.Trial) -> dict[str, Any]:
        return {"alpha": trial.suggest_float("ridge_alpha", 1e-3, 1e4, log=True)}

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return np.nan_to_num((x - self.mean) / self.scale, nan=0.0)

    def fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        with np.errstate(all="ignore"):
            self.mean = np.nan_to_num(np.nanmean(x, axis=0))
            scale = np.nan_to_num(np.nanstd(x, axis=0), nan=1.0)
        self.scale = np.where(scale > 1e-9, scale, 1.0)
        z = self._standardise(x)
        if self.weight_ is None:
            z_mean, y_mean = z.mean(axis=0), float(y.mean())
            zc = z - z_mean
            gram = zc.T @ zc + float(self.params["alpha"]) * np.eye(z.shape[1])
            self.coef = np.linalg.solve(gram, zc.T @ (y - y_mean))
        else:  # weighted least squares, weights scaled to mean 1 so alpha keeps its meaning
            w = self.weight_ / self.weight_.mean()
            z_mean, y_mean = (w @ z) / w.sum(), float(w @ y / w.sum())
            zc = z - z_mean
            gram = zc.T @ (zc * w[:, None]) + float(self.params["alpha"]) * np.eye(z.shape[1])
            self.coef = np.linalg.solve(gram, zc.T @ (w * (y - y_mean)))
        self.intercept = y_mean - float(z_mean @ self.coef)
        return self

    def predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        return _rowdot(self._standardise(x), self.coef) + self.intercept

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept}

    def set_state(self, state: dict[str, Any]) -> None:
        self.mean, self.scale = np.asarray(state["mean"]), np.asarray(state["scale"])
        self.coef, self.intercept = np.asarray(state["coef"]), float(state["intercept"])


class LightGBMMeta(MetaLearner):
    """A small LightGBM on the base predictions and raw features. Its round count is not searched: each fit
    runs up to `max_rounds` and records the held-out L1 curve; the stack reads the best round off the mean curve
    (one fit per fold instead of one per round count)."""

    name = "lgbm"
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

    def fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
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
        return self

    def predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        return self.model.predict(x, num_iteration=at, num_threads=self.threads)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.model_to_string()}

    def set_state(self, state: dict[str, Any]) -> None:
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


METAS: dict[str, type[MetaLearner]] = {cls.name: cls for cls in (MeanMeta, SingleMeta, BlendMeta, RidgeMeta,
                                                                    LightGBMMeta)}
# Always evaluated, whatever stacking.metas says: the simple candidates a fitted meta must beat.
BASELINE_METAS = ("mean", "single")
# Share of candidates per meta, relative (data-independent). A LightGBM candidate costs ~10x a ridge or blend
# one (15 boosted fits), so it gets fewer draws; the others search 1-2 parameters and saturate anyway.
CANDIDATE_WEIGHTS = {"blend": 2, "ridge": 2, "lgbm": 1}


def meta_class(name: str) -> type[MetaLearner]:
    if name not in METAS:
        raise ValueError(f"unknown meta-learner {name!r}; known: {', '.join(sorted(METAS))}")
    return METAS[name]
