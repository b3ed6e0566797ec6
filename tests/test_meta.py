"""Meta-learner fits reach their optimum (a fit that stops early loses to a subset of its own columns)."""

from __future__ import annotations

import numpy as np
import pytest

from stacking.meta_linear import BlendMeta, _pseudo_huber


def _correlated_predictions(n_base: int, rows: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    """Log prices near 3 and base predictions shrunk towards the mean that share most of their heavy-tailed
    error, like real stacked learners (this seed made the uncentred fit stall)."""
    rng = np.random.default_rng(0)
    y = rng.normal(3.0, 0.75, rows)
    shared = rng.standard_t(3, rows) * 0.3
    columns = []
    for _ in range(n_base):
        shrink = rng.uniform(0.75, 0.9)
        columns.append(shrink * y + (1 - shrink) * 3.0 + shared * rng.uniform(0.8, 1.2)
                       + rng.standard_t(3, rows) * 0.1)
    return np.column_stack(columns), y


def _fitted_loss(meta: BlendMeta, x: np.ndarray, y: np.ndarray) -> float:
    return float(_pseudo_huber(meta.predict(x) - y, float(meta.params["delta"]))[0].mean())


@pytest.mark.parametrize("convex", [False, True])
def test_a_blend_of_more_learners_fits_at_least_as_well_as_a_blend_of_fewer(convex: bool) -> None:
    """The blend's loss is convex in its weights, so adding columns can only lower the optimum. Before the
    columns were centred, L-BFGS-B stopped a few steps in on 7 correlated columns and the superset fitted worse."""
    x, y = _correlated_predictions(7)
    params = {"delta": 0.05, "convex": convex}
    subset = BlendMeta(params, 4, 0).fit(x[:, :4], y)
    superset = BlendMeta(params, 7, 0).fit(x, y)
    assert _fitted_loss(superset, x, y) <= _fitted_loss(subset, x[:, :4], y) + 1e-7
    assert (superset.weights >= 0).all()  # blend weights are bounded (non-negative) or softmax (convex)
    if convex:
        assert superset.weights.sum() == pytest.approx(1.0) and superset.intercept == 0.0


class _Uncentred(BlendMeta):
    centre_columns = False


def test_the_stalled_blend_is_still_caught() -> None:
    """Control: the fit as it was before centring (raw columns) stalls on the same data, and the check above
    would catch it: its superset fits worse than its subset."""
    x, y = _correlated_predictions(7)
    params = {"delta": 0.05, "convex": False}
    subset = _Uncentred(params, 4, 0).fit(x[:, :4], y)
    superset = _Uncentred(params, 7, 0).fit(x, y)
    assert _fitted_loss(superset, x, y) > _fitted_loss(subset, x[:, :4], y) + 1e-7
