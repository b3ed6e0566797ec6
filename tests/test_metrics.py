"""Any target and metric: the metrics registry against hand-computed values (zeros included), the loss a metric
asks for moves a learner where it should, and the stack is chosen by the configured metric."""

from __future__ import annotations

import math

import numpy as np
import pytest

from featurestore.config import Config, StackingConfig
from models.base import Inputs
from models.metrics import METRICS, leaderboard_score, mape, metric, to_price, to_target
from models.registry import learner_class


def test_each_metric_against_hand_computed_values() -> None:
    y, p = np.array([100.0, 50.0, 10.0]), np.array([110.0, 40.0, 10.0])
    assert metric("smape").score(y, p) == pytest.approx(100 / 3 * (20 / 210 + 20 / 90))
    assert metric("mape").score(y, p) == pytest.approx(100 / 3 * (10 / 100 + 10 / 50))
    assert metric("mae").score(y, p) == pytest.approx(20 / 3)
    assert metric("rmse").score(y, p) == pytest.approx(math.sqrt(200 / 3))
    expected = math.sqrt(((math.log(111) - math.log(101)) ** 2 + (math.log(41) - math.log(51)) ** 2) / 3)
    assert metric("rmsle").score(y, p) == pytest.approx(expected)
    assert leaderboard_score("mape", 51.8) == pytest.approx(48.2) and leaderboard_score("mape", 130.0) == 0.0
    assert leaderboard_score("smape", 40.0) is None
    assert set(METRICS) == {"smape", "mape", "mae", "rmse", "rmsle"}


def test_zero_targets_follow_each_metrics_rule() -> None:
    y, p = np.array([0.0, 10.0, 0.0]), np.array([0.0, 12.0, 5.0])
    assert metric("smape").score(y, p) == pytest.approx(100 / 3 * (0 + 4 / 22 + 2))  # a pair of zeros counts 0
    with pytest.raises(ValueError, match=r"zero target: 2 row\(s\), positions \[0, 2\]"):
        mape(y, p)
    assert metric("mae").score(y, p) == pytest.approx(7 / 3)
    with pytest.raises(ValueError, match="above -1"):
        metric("rmsle").score(np.array([-2.0]), np.array([1.0]))


def test_target_transforms_round_trip() -> None:
    price = np.array([0.5, 3.0, 120.0])
    for target in ("log1p", "log", "none"):
        assert np.allclose(to_price(to_target(price, target), target), price)
    with pytest.raises(ValueError, match="task.target"):
        to_target(price, "sqrt")


def _skewed(n: int = 3000) -> tuple[Inputs, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.exp(rng.normal(6.0, 1.0, n))  # lognormal: mean ~ 1.65x the median
    noise = rng.normal(size=(n, 3)).astype(np.float32)  # features that carry nothing: the fit is a constant
    return Inputs(noise), y


def test_a_learner_fit_for_mape_moves_below_the_median_and_one_fit_for_l2_above() -> None:
    """MAPE's best constant is the 1/y-weighted median (below the median); L2 on the raw target gives the mean
    (above it). What `objective = "auto"` resolves to for each metric must land where the metric wants it."""
    from dataclasses import replace

    x, y = _skewed()
    train, watch, test = np.arange(0, 2000), np.arange(2000, 2500), np.arange(2500, 3000)
    cls = learner_class("lgbm")
    base = replace(cls.default_settings(), rounds=200, learning_rate=0.05, early_stopping_rounds=30)

    def fit(metric_name: str) -> np.ndarray:
        task = metric(metric_name)
        target = task.target
        weights = task.fit_weights(y)
        data = x if weights is None else Inputs(x.dense, None, weights)
        learner = cls(replace(base, objective=task.objective), 0, 1, ["a", "b", "c"], [])
        learner.fit(data.rows(train), to_target(y[train], target), data.rows(watch), to_target(y[watch], target))
        return to_price(learner.predict(x.rows(test)), target)

    for_mape, for_rmse = np.median(fit("mape")), np.median(fit("rmse"))
    median, mean = np.median(y), np.mean(y)
    assert for_mape < 0.8 * median < median < 0.8 * mean < for_rmse
    assert mape(y[test], np.full(len(test), for_mape)) < mape(y[test], np.full(len(test), for_rmse))


def test_the_stack_is_chosen_by_the_configured_metric() -> None:
    """Two base learners: one predicts the median (SMAPE's pick), one the 1/y-weighted median (MAPE's). The
    stack's `single` candidate, its `constant` candidate and its reported scores follow task.metric: under the
    lowest-score rule `single` takes the metric's learner; under the default rule the simpler `constant` (as
    good here: both learners are constants) sits at the metric's own optimum."""
    from stacking.inputs import StackInputs
    from stacking.levels import run_levels

    rng = np.random.default_rng(1)
    n = 600
    price = np.exp(rng.normal(5.0, 0.8, n))
    weighted_median = np.exp(5.0 - 0.8**2)  # the 1/y-weighted median of a lognormal
    x = np.column_stack([np.full(n, np.log1p(np.exp(5.0))), np.full(n, np.log1p(weighted_median))])
    x = x + rng.normal(0, 0.01, x.shape)
    fold = np.arange(n) % 5
    chosen, level = {}, {}
    for selection in ("lowest", "within_se"):
        config = Config(stacking=StackingConfig(metas=[], selection=selection))
        for name in ("smape", "mape"):
            inputs = StackInputs(ids=np.arange(n), fold=fold, price=price, x=x, feature_names=["median", "low"],
                                 n_base=2, metric=name)
            result = run_levels(inputs, config, 3, None, f"metric-{name}-{selection}")
            assert result.record.metric == name
            assert result.record.stack_cv == pytest.approx(metric(name).score(price, np.expm1(result.meta_oof)))
            chosen[selection, name] = (result.final_name, result.final_meta.state())
            level[selection, name] = float(np.expm1(result.final_meta.predict(x[:1]))[0])
    assert chosen["lowest", "smape"] == ("single", {"column": 0})
    assert chosen["lowest", "mape"] == ("single", {"column": 1})
    assert chosen["within_se", "smape"][0] == chosen["within_se", "mape"][0] == "constant"
    assert abs(np.log(level["within_se", "smape"] / np.exp(5.0))) < 0.1
    assert abs(np.log(level["within_se", "mape"] / weighted_median)) < 0.1
