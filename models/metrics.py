"""The metrics registry: what a task is scored on, and the target transforms its models fit.

Every score in the product (fold scores, OOF scores, the stack's Optuna objective and nested CV, the report, the
CLI summary) comes from `metric(config_name).score(true, predicted)` on the original target scale. All metrics
here are "lower is better". Each says how it treats zeros, and what a learner should fit to be good at it:

- smape: 100 * mean(2|p - y| / (|y| + |p|)), a pair of zeros counts 0; optimum near the median; learners fit
  Huber on log1p(y).
- mape: 100 * mean(|p - y| / |y|), a zero target is an error naming the rows; optimum the 1/y-weighted median
  (below the median); learners fit L1 on log1p(y) with rows weighted 1/y (same constant optimum).
- mae: mean(|p - y|); optimum the median, which a monotone transform keeps: L1 on log1p(y).
- rmse: sqrt(mean((p - y)^2)); optimum the mean: L2 on the raw target (a log target gives the geometric mean).
- rmsle: sqrt(mean((log1p p - log1p y)^2)), values must be above -1; L2 on log1p(y).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from featurestore.errors import ConfigError, InputError

# Huber's delta in log-price units, for every learner that fits a Huber loss: residuals beyond ~1 (a factor of e)
# count linearly, like SMAPE's bounded loss.
HUBER_DELTA = 1.0


def _pair(true: np.ndarray, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(true, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    if true.shape != predicted.shape:
        raise ValueError(f"{true.shape[0]} true values but {predicted.shape[0]} predictions")
    # A NaN prediction must never score: SMAPE's 0/0 rule scored a NaN column as perfect (stack "CV 0.0").
    for what, values in (("predictions", predicted), ("true values", true)):
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise InputError(f"{bad.size} of {values.size} {what} are not finite (NaN or inf), positions "
                             f"{bad[:5].tolist()}; a score over them would be meaningless")
    return true, predicted


def smape(true: np.ndarray, predicted: np.ndarray) -> float:
    true, predicted = _pair(true, predicted)
    denominator = np.abs(true) + np.abs(predicted)
    ratio = np.divide(2.0 * np.abs(predicted - true), denominator, out=np.zeros_like(denominator),
                      where=denominator > 0)
    return float(100.0 * ratio.mean())


def mape(true: np.ndarray, predicted: np.ndarray) -> float:
    true, predicted = _pair(true, predicted)
    zero = np.flatnonzero(true == 0)
    if zero.size:
        raise InputError(f"MAPE is undefined for a zero target: {zero.size} row(s), positions {zero[:5].tolist()}; "
                         "use smape or mae for targets that can be 0")
    return float(100.0 * np.mean(np.abs(predicted - true) / np.abs(true)))


def mae(true: np.ndarray, predicted: np.ndarray) -> float:
    true, predicted = _pair(true, predicted)
    return float(np.mean(np.abs(predicted - true)))


def rmse(true: np.ndarray, predicted: np.ndarray) -> float:
    true, predicted = _pair(true, predicted)
    return float(np.sqrt(np.mean((predicted - true) ** 2)))


def rmsle(true: np.ndarray, predicted: np.ndarray) -> float:
    true, predicted = _pair(true, predicted)
    if np.any(true <= -1) or np.any(predicted <= -1):
        raise InputError("RMSLE needs true values and predictions above -1")
    return float(np.sqrt(np.mean((np.log1p(predicted) - np.log1p(true)) ** 2)))


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value where the sorted cumulative weight reaches half: L1's constant optimum under row weights (with
    weights 1/y, MAPE's best constant)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(np.asarray(weights, dtype=np.float64)[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2.0)])


def best_constant(metric_name: str, true: np.ndarray) -> float:
    """The one value that scores best under the metric on `true`: searched over 199 quantiles of `true`, its mean
    and its 1/y-weighted median (the exact optimum of mae/smape-like metrics is a quantile; rmse's is the mean;
    mape's the weighted median). Ties: the lowest value."""
    true = np.asarray(true, dtype=np.float64)
    values = [*np.quantile(true, np.linspace(0.005, 0.995, 199)), float(true.mean())]
    if np.all(true != 0):
        values.append(weighted_median(true, 1.0 / np.abs(true)))
    score = metric(metric_name).score
    scores = [(score(true, np.full(true.shape, v)), v) for v in sorted(set(values))]
    return float(min(scores)[1])


def _inverse_target(true: np.ndarray) -> np.ndarray:
    """Row weights 1/y, scaled to mean 1 (so learning rates and regularisation keep their meaning)."""
    weight = 1.0 / np.abs(np.asarray(true, dtype=np.float64))
    return weight / weight.mean()


@dataclass(frozen=True)
class Metric:
    name: str
    score: Callable[[np.ndarray, np.ndarray], float]
    definition: str
    zeros: str  # how a zero target is treated
    objective: str  # the learners' loss under objective = "auto": huber | l1 | l2
    target: str  # the target transform under task.target = "auto"
    weights: Callable[[np.ndarray], np.ndarray] | None = None  # row weights for fitting, from the true values
    weights_rule: str = "none"

    def fit_weights(self, true: np.ndarray) -> np.ndarray | None:
        return None if self.weights is None else self.weights(true)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("smape", smape, "100 * mean(2|p - y| / (|y| + |p|))", "a pair of zeros scores 0", "huber", "log1p"),
    Metric("mape", mape, "100 * mean(|p - y| / |y|)", "a zero target is an error naming the rows", "l1", "log1p",
           _inverse_target, "1/y, mean 1"),
    Metric("mae", mae, "mean(|p - y|)", "no special case", "l1", "log1p"),
    Metric("rmse", rmse, "sqrt(mean((p - y)^2))", "no special case", "l2", "none"),
    Metric("rmsle", rmsle, "sqrt(mean((log1p p - log1p y)^2))", "needs values above -1", "l2", "log1p"),
)}
TARGETS = ("log1p", "log", "none")


def metric(name: str) -> Metric:
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]


def leaderboard_score(metric_name: str, value: float) -> float | None:
    """The 2023 challenge's leaderboard score for MAPE: max(0, 100 * (1 - MAPE)) with MAPE as a fraction."""
    return max(0.0, 100.0 - value) if metric_name == "mape" else None


def to_price(prediction: np.ndarray, target: str) -> np.ndarray:
    """Model output -> the target's scale, kept strictly positive (0.01 at least) like the targets ingest
    accepts, so the stack can work in log space."""
    if target == "log1p":
        return np.clip(np.expm1(prediction), 0.01, None)
    if target == "log":
        return np.clip(np.exp(prediction), 0.01, None)
    if target == "none":
        return np.clip(np.asarray(prediction, dtype=np.float64), 0.01, None)
    raise ConfigError(f"task.target = {target!r}; expected one of {', '.join(TARGETS)}")


def to_target(price: np.ndarray, target: str) -> np.ndarray:
    price = np.asarray(price, dtype=np.float64)
    if target == "log1p":
        return np.log1p(price)
    if target == "log":
        return np.log(price)
    if target == "none":
        return price
    raise ConfigError(f"task.target = {target!r}; expected one of {', '.join(TARGETS)}")
