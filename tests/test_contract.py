"""One contract suite over every registered learner and meta-learner (scikit-learn's `check_estimator` idea)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from featurestore.config import Config
from models.base import LEARNERS, BaseLearner, Inputs, register
from models.contract import verify_learner
from models.registry import learner_class
from models.train import resolved_settings
from stacking.meta import METAS


def _small(name: str) -> object:
    settings = copy.deepcopy(resolved_settings(Config(), name))
    for key, value in {"rounds": 40, "early_stopping_rounds": 5, "epochs": 3, "hidden": [8], "members": 2,
                       "max_seq_length": 16, "batch_size": 64}.items():
        if hasattr(settings, key):
            setattr(settings, key, value)
    return settings


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_every_learner_meets_the_contract(name: str) -> None:
    verify_learner(learner_class(name), _small(name))


def test_the_contract_catches_a_broken_learner() -> None:
    """Control: a learner whose saved file loses its state fails `verify_learner`."""

    class Forgetful(BaseLearner):
        name = "forgetful_test"
        file_pattern = "fold{fold}.txt"

        def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
            self.mean_ = float(y.mean())

        def _predict(self, x: Inputs) -> np.ndarray:
            return np.full(len(x), self.mean_)

        def _save(self, path) -> None:  # noqa: ANN001
            path.write_text("0.0")

        def _load(self, path) -> None:  # noqa: ANN001
            self.mean_ = float(path.read_text())

    with pytest.raises(AssertionError, match="save -> load"):
        verify_learner(Forgetful, object())


def test_register_refuses_a_second_learner_with_a_taken_name() -> None:
    class Impostor(LEARNERS["ridge"]):  # type: ignore[misc, valid-type]
        pass

    with pytest.raises(ValueError, match="learner name 'ridge' is taken by models.linear.RidgeLearner"):
        register(Impostor)
    assert LEARNERS["ridge"].__name__ == "RidgeLearner"


@pytest.mark.parametrize("name", sorted(METAS))
def test_every_meta_learner_round_trips_its_state(name: str) -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.normal(3, 1, 300), rng.normal(3, 1, 300), rng.normal(0, 1, 300)])
    y = x[:, :2].mean(axis=1) + rng.normal(0, 0.1, 300)
    params = {"blend": {"delta": 0.5, "convex": False}, "ridge": {"alpha": 1.0},
              "lgbm": {"num_leaves": 7, "learning_rate": 0.1, "min_data_in_leaf": 10, "lambda_l2": 1.0,
                       "objective": "huber", "rounds": 30}}.get(name, {})
    meta = METAS[name](params, 2, 0, 1).fit(x, y)
    again = METAS[name](params, 2, 0, 1)
    again.set_state(meta.state())
    assert np.array_equal(meta.predict(x), again.predict(x))
    assert np.array_equal(meta.predict(x[:7]), meta.predict(x)[:7]), "a row's prediction depends on its batch"
