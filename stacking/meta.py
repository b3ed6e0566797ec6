"""Meta-learners: combine the base learners' log-price predictions (plus a few raw features) into one.

Each has an Optuna search space (`suggest`), fits on numpy arrays and saves itself as JSON (the LightGBM one
embeds LightGBM's own text model format), so a stored stack is never unpickled.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import lightgbm as lgb
import numpy as np
import optuna
from scipy.optimize import minimize
from sklearn.linear_model import Ridge


class MetaLearner(ABC):
    name: str

    def __init__(self, params: dict[str, Any], n_base: int, seed: int, threads: int = 1) -> None:
        self.params = params
        self.n_base = n_base  # the first n_base columns are base-learner predictions (log1p price)
        self.seed = seed
        self.threads = threads

    @staticmethod
    @abstractmethod
    def suggest(trial: optuna.Trial) -> dict[str, Any]: ...

    @abstractmethod
    def fit(self, x: np.ndarray, y: np.ndarray) -> None: ...

    @abstractmethod
    def predict(self, x: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def state(self) -> dict[str, Any]: ...

    @abstractmethod
    def set_state(self, state: dict[str, Any]) -> None: ...


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

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        base = x[:, : self.n_base]
        delta = float(self.params["delta"])
        convex = bool(self.params["convex"])

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = self._weights(theta)
            value, slope = _pseudo_huber(base @ w + b - y, delta)
            grad_w = base.T @ slope / len(y)
            if convex:  # chain rule through the softmax
                grad = w * (grad_w - w @ grad_w)
                return float(value.mean()), grad
            return float(value.mean()), np.append(grad_w, slope.mean())

        if convex:
            theta0, bounds = np.zeros(self.n_base), None
        else:
            theta0 = np.append(np.full(self.n_base, 1.0 / self.n_base), 0.0)
            bounds = [(0.0, None)] * self.n_base + [(None, None)]
        result = minimize(loss, theta0, jac=True, method="L-BFGS-B", bounds=bounds)
        self.weights, self.intercept = self._weights(result.x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        # Row by row (not BLAS matvec, whose blocking depends on the row count): a row's prediction must not
        # depend on its batch-mates, so `predict` on a few rows equals the pipeline's own numbers bit for bit.
        return (x[:, : self.n_base] * self.weights).sum(axis=1) + self.intercept

    def state(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "intercept": self.intercept}

    def set_state(self, state: dict[str, Any]) -> None:
        self.weights = np.asarray(state["weights"])
        self.intercept = float(state["intercept"])


class RidgeMeta(MetaLearner):
    """Ridge regression on standardised base predictions and raw features (missing values at the mean)."""

    name = "ridge"

    @staticmethod
    def suggest(trial: optuna.Trial) -> dict[str, Any]:
        return {"alpha": trial.suggest_float("ridge_alpha", 1e-3, 1e3, log=True)}

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        return np.nan_to_num((x - self.mean) / self.scale, nan=0.0)

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        with np.errstate(all="ignore"):
            self.mean = np.nan_to_num(np.nanmean(x, axis=0))
            scale = np.nan_to_num(np.nanstd(x, axis=0), nan=1.0)
        self.scale = np.where(scale > 1e-9, scale, 1.0)
        model = Ridge(alpha=float(self.params["alpha"])).fit(self._standardise(x), y)
        self.coef, self.intercept = model.coef_, float(model.intercept_)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self._standardise(x) * self.coef).sum(axis=1) + self.intercept  # row by row, see BlendMeta

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(), "coef": self.coef.tolist(),
                "intercept": self.intercept}

    def set_state(self, state: dict[str, Any]) -> None:
        self.mean, self.scale = np.asarray(state["mean"]), np.asarray(state["scale"])
        self.coef, self.intercept = np.asarray(state["coef"]), float(state["intercept"])


class LightGBMMeta(MetaLearner):
    """A small LightGBM on the base predictions and raw features."""

    name = "lgbm"

    @staticmethod
    def suggest(trial: optuna.Trial) -> dict[str, Any]:
        return {"num_leaves": trial.suggest_int("lgbm_num_leaves", 4, 31, log=True),
                "learning_rate": trial.suggest_float("lgbm_learning_rate", 0.01, 0.2, log=True),
                "rounds": trial.suggest_int("lgbm_rounds", 30, 300, log=True),
                "min_data_in_leaf": trial.suggest_int("lgbm_min_data_in_leaf", 5, 100, log=True),
                "lambda_l2": trial.suggest_float("lgbm_lambda_l2", 1e-3, 10.0, log=True),
                "objective": trial.suggest_categorical("lgbm_objective", ["huber", "regression_l1"])}

    def fit(self, x: np.ndarray, y: np.ndarray) -> None:
        p = self.params
        params = {"objective": p["objective"], "alpha": 1.0, "num_leaves": p["num_leaves"],
                  "learning_rate": p["learning_rate"], "min_data_in_leaf": p["min_data_in_leaf"],
                  "lambda_l2": p["lambda_l2"], "seed": self.seed, "deterministic": True, "force_row_wise": True,
                  "max_bin": 63, "num_threads": self.threads, "verbosity": -1}
        self.model = lgb.train(params, lgb.Dataset(x, y), num_boost_round=int(p["rounds"]))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)

    def state(self) -> dict[str, Any]:
        return {"model": self.model.model_to_string()}

    def set_state(self, state: dict[str, Any]) -> None:
        self.model = lgb.Booster(model_str=state["model"])


METAS: dict[str, type[MetaLearner]] = {cls.name: cls for cls in (BlendMeta, RidgeMeta, LightGBMMeta)}


def meta_class(name: str) -> type[MetaLearner]:
    if name not in METAS:
        raise ValueError(f"unknown meta-learner {name!r}; known: {sorted(METAS)}")
    return METAS[name]
