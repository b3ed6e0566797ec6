"""`verify_learner(cls, settings)`: the contract every registered base learner must meet (scikit-learn's
`check_estimator`, for this project's protocol). `tests/test_contract.py` runs it over the whole registry, so a
new learner is checked the day it is registered.

Checked on a small synthetic problem (dense block + a sparse block for learners that read sparse input + short
texts whose words track the target for learners that read text):
fit → predictions of the right shape, finite, clearly better than the best constant on held-out rows; `predict`
before `fit` raises NotFittedError; save → load in a
fresh instance → identical predictions; the same seed → identical predictions; importance keys ⊆ feature names;
a learner that does not read sparse input refuses one; `fit` leaves its settings untouched; a row's prediction
does not depend on the other rows predicted with it; for learners that claim `supports_weights`, a row of weight
0 counts as a removed row (a fit whose 0-weight rows carry wild targets stays near the fit without them, and far
from the fit that weighs them in, the control).
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import is_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from models.base import BaseLearner, Inputs, NotFittedError

# Held-out MAE must be below this share of the best constant's (the signal explains most of the variance).
LEARNS = 0.8
WORDS = np.array(["cheap", "plain", "small", "basic", "standard", "large", "premium", "deluxe", "luxury"])


def _problem(reads_sparse: bool, seed: int = 0, reads_text: bool = False) -> tuple[Inputs, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    n = 400
    dense = rng.normal(size=(n, 4)).astype(np.float32)
    dense[rng.random((n, 4)) < 0.05] = np.nan  # learners must cope with missing values
    sparse = sp.random(n, 50, density=0.1, format="csr", dtype=np.float32, random_state=rng) if reads_sparse else None
    y = 3.0 + np.nan_to_num(dense[:, 0]) * 0.5 + rng.normal(0, 0.1, n)
    if sparse is not None:
        y = y + np.asarray(sparse[:, :5].sum(axis=1)).ravel()
    names = [f"d{i}" for i in range(4)] + ([f"s{i}" for i in range(50)] if sparse is not None else [])
    text = None
    if reads_text:  # a word that tracks the target, plus noise words
        level = np.clip(np.round((y - y.min()) / (np.ptp(y) + 1e-9) * (len(WORDS) - 1)), 0, len(WORDS) - 1)
        text = np.array([f"{WORDS[int(v)]} item {rng.integers(1000)}" for v in level], dtype=object)
    return Inputs(dense, sparse, text=text), y, names


def verify_learner(cls: type[BaseLearner], settings: Any) -> None:
    """Raise AssertionError naming the broken rule; return None when the learner meets the contract."""
    x, y, names = _problem(cls.reads_sparse, reads_text=cls.reads_text)
    train, watch, test = np.arange(0, 300), np.arange(300, 350), np.arange(350, 400)

    def fitted(seed: int) -> BaseLearner:
        learner = cls(settings, seed, 1, names, [])
        return learner.fit(x.rows(train), y[train], x.rows(watch), y[watch])

    fresh = cls(settings, 0, 1, names, [])
    try:
        fresh.predict(x.rows(test))
    except NotFittedError:
        pass
    else:
        raise AssertionError(f"{cls.name}: predict before fit must raise NotFittedError")
    before = copy.deepcopy(settings)
    first = fitted(7)
    if is_dataclass(settings):  # every registered learner's settings are (LearnerSettings)
        assert settings == before, f"{cls.name}: fit changed its settings ({before} -> {settings})"
    pred = first.predict(x.rows(test))
    parts = np.concatenate([first.predict(x.rows(test[:1])), first.predict(x.rows(test[1:17])),
                            first.predict(x.rows(test[17:]))])
    assert np.array_equal(pred, parts), f"{cls.name}: a row's prediction depends on the rows predicted with it"
    assert pred.shape == (len(test),) and np.isfinite(pred).all(), f"{cls.name}: bad predictions {pred[:3]}"
    assert np.array_equal(pred, fitted(7).predict(x.rows(test))), f"{cls.name}: same seed, different output"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / cls.file_pattern.format(fold=0)
        first.save(path)
        loaded = cls(settings, 7, 1, names, []).load(path)
        assert np.array_equal(pred, loaded.predict(x.rows(test))), f"{cls.name}: save -> load changed predictions"
    # It learns: on held-out rows it beats the best constant (the training median) clearly. A learner that ignores
    # its features passed every other rule.
    constant = float(np.mean(np.abs(y[test] - np.median(y[train]))))
    error = float(np.mean(np.abs(y[test] - pred)))
    assert error < LEARNS * constant, (f"{cls.name}: learns nothing: held-out MAE {error:.3f} vs {constant:.3f} for "
                                       "the best constant")
    unknown = set(first.importance()) - set(names)
    assert not unknown, f"{cls.name}: importance names {sorted(unknown)[:3]} are not feature names"
    if not cls.reads_sparse:
        sparse_x, _, sparse_names = _problem(True, reads_text=cls.reads_text)
        try:
            cls(settings, 0, 1, sparse_names, []).fit(sparse_x.rows(train), y[train], sparse_x.rows(watch), y[watch])
        except ValueError:
            pass
        else:
            raise AssertionError(f"{cls.name}: does not read sparse input but accepted it")
    if cls.supports_weights:
        _zero_weight_is_a_removed_row(cls, settings, x, y, names, train, watch, test)


def _zero_weight_is_a_removed_row(cls: type[BaseLearner], settings: Any, x: Inputs, y: np.ndarray,
                                  names: list[str], train: np.ndarray, watch: np.ndarray, test: np.ndarray) -> None:
    """Exact equality is too strict (a GBDT bins on every row; minibatches shift), so: most training rows (a
    majority, so that robust losses such as L1 and Huber cannot shrug them off) get targets moved by +20. With
    weight 0 the predictions must stay close to a fit without those rows; with weight 1 (the control) they must
    move far, or the check could not tell."""
    bad = train[train % 3 != 0]
    moved = y.copy()
    moved[bad] += 20.0
    kept = np.setdiff1d(train, bad)

    def predict(rows: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        learner = cls(settings, 7, 1, names, [])
        inputs = replace(x.rows(rows), weight=weight)
        return learner.fit(inputs, moved[rows], x.rows(watch), moved[watch]).predict(x.rows(test))

    removed = predict(kept, None)
    zero = predict(train, np.where(np.isin(train, bad), 0.0, 1.0))
    counted = predict(train, np.ones(len(train)))
    gap, pulled = float(np.mean(np.abs(zero - removed))), float(np.mean(np.abs(counted - removed)))
    assert pulled > 1.0, f"{cls.name}: control: weight-1 wild rows moved predictions by only {pulled:.3f}"
    assert gap < 0.1 * pulled, (f"{cls.name}: 0-weight rows moved predictions by {gap:.3f} (weighted in: "
                                f"{pulled:.3f}); a 0 weight must count as a removed row")
