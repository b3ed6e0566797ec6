"""One contract suite over every registered learner and meta-learner (scikit-learn's `check_estimator` idea)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest

from featurestore.config import Config
from models.base import BaseLearner, Inputs
from models.contract import verify_learner
from models.registry import LEARNERS, learner_class, register
from models.train import resolved_settings
from stacking.meta import METAS


def _small(name: str) -> object:
    settings = copy.deepcopy(resolved_settings(Config(), name))
    # Small but able to learn the synthetic signal (3 epochs of 5 steps left the MLPs at the constant): fine-tuning a
    # transformer keeps 3 epochs (it is slow and its first steps already move it).
    epochs = 3 if learner_class(name).reads_text else 30
    small = {"rounds": 40, "early_stopping_rounds": 5, "epochs": epochs, "hidden": [8], "members": 2,
             "max_seq_length": 16, "batch_size": 64}
    known = {f.name for f in dataclasses.fields(settings)}
    return dataclasses.replace(settings, **{k: v for k, v in small.items() if k in known})


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

    with pytest.raises(ValueError, match="learner name 'ridge' is taken by models.learners.linear.RidgeLearner"):
        register(Impostor)
    assert LEARNERS["ridge"].__name__ == "RidgeLearner"


@pytest.mark.parametrize("name", sorted(METAS))
def test_every_meta_learner_meets_the_contract(name: str) -> None:
    """Every registered meta-learner (built-in or plug-in, none listed here): parameters from its own search space,
    not fitted -> NotFittedError, it learns (beats the best constant on base predictions that carry the signal),
    its state round-trips, and a row's prediction does not depend on its batch-mates."""
    import optuna

    from models.base import NotFittedError

    rng = np.random.default_rng(0)
    y = rng.normal(3, 1, 2000)
    x = np.column_stack([y + rng.normal(0, 0.3, 2000), y + rng.normal(0, 0.5, 2000), rng.normal(0, 1, 2000)])
    cls = METAS[name]
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    params = cls.suggest(trial)
    if cls.curve_param:
        params[cls.curve_param] = 30
    with pytest.raises(NotFittedError):
        cls(params, 2, 0, 1).predict(x)
    meta = cls(params, 2, 0, 1).fit(x, y)
    constant = np.abs(y - np.median(y)).mean()
    if cls.complexity == 0:  # the floor itself (the metric's best constant): at least as good as the median
        from models.metrics import smape

        price = np.expm1(y)
        assert smape(price, np.expm1(meta.predict(x))) <= smape(price, np.full(len(y), np.median(price)))
        assert np.ptp(meta.predict(x)) == 0
    else:
        assert np.abs(meta.predict(x) - y).mean() < 0.6 * constant, f"{name} learns nothing"
    again = cls(params, 2, 0, 1)
    again.set_state(meta.state())
    assert np.array_equal(meta.predict(x), again.predict(x))
    assert np.array_equal(meta.predict(x[:7]), meta.predict(x)[:7]), "a row's prediction depends on its batch"


def test_register_meta_refuses_a_second_meta_with_a_taken_name() -> None:
    from featurestore.errors import ConfigError
    from stacking.meta import register_meta

    class Impostor(METAS["blend"]):  # type: ignore[misc, valid-type]
        pass

    with pytest.raises(ConfigError, match="meta-learner name 'blend' is taken by stacking.meta_linear.BlendMeta"):
        register_meta(Impostor)
    assert METAS["blend"].__name__ == "BlendMeta"


def test_the_contract_catches_a_learner_that_learns_nothing() -> None:
    """Control: a learner that ignores its features (predicts the training median, saves and loads it faithfully)
    meets every other rule; the learning check fails it."""

    class Constant(BaseLearner):
        name = "constant_test"
        file_pattern = "fold{fold}.txt"
        uses_early_stopping = False

        def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
            self.value_ = float(np.median(y))

        def _predict(self, x: Inputs) -> np.ndarray:
            return np.full(len(x), self.value_)

        def _save(self, path) -> None:  # noqa: ANN001
            path.write_text(repr(self.value_))

        def _load(self, path) -> None:  # noqa: ANN001
            self.value_ = float(path.read_text())

    with pytest.raises(AssertionError, match="learns nothing"):
        verify_learner(Constant, object())


@dataclasses.dataclass
class _LstsqSettings:
    shrink: float = 1.0


class _Lstsq(BaseLearner):
    """A learner that meets the contract (least squares on the dense columns, weighted): the base of the
    controls below, each breaking one rule."""

    name = "lstsq_test"
    file_pattern = "fold{fold}.npy"
    uses_early_stopping = False
    supports_weights = True

    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        design = np.column_stack([np.nan_to_num(train.dense), np.ones(len(train))])
        w = np.ones(len(train)) if train.weight is None else train.weight
        gram = design.T @ (design * w[:, None]) + self.settings.shrink * np.eye(design.shape[1])
        self.coef_ = np.linalg.solve(gram, design.T @ (w * y))

    def _predict(self, x: Inputs) -> np.ndarray:
        return np.column_stack([np.nan_to_num(x.dense), np.ones(len(x))]) @ self.coef_

    def _save(self, path) -> None:  # noqa: ANN001
        np.save(path, self.coef_)

    def _load(self, path) -> None:  # noqa: ANN001
        self.coef_ = np.load(path)


def test_the_contract_passes_the_honest_control_learner() -> None:
    verify_learner(_Lstsq, _LstsqSettings())


def test_the_contract_catches_a_learner_that_ignores_its_weights() -> None:
    class Unweighted(_Lstsq):
        def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
            super()._fit(dataclasses.replace(train, weight=None), y, watch, y_watch)

    with pytest.raises(AssertionError, match="a 0 weight must count as a removed row"):
        verify_learner(Unweighted, _LstsqSettings())


def test_the_contract_catches_a_learner_that_changes_its_settings() -> None:
    class Meddling(_Lstsq):
        def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
            self.settings.shrink *= 2  # e.g. a learning-rate schedule written back into the settings
            super()._fit(train, y, watch, y_watch)

    with pytest.raises(AssertionError, match="fit changed its settings"):
        verify_learner(Meddling, _LstsqSettings())


def test_the_contract_catches_predictions_that_depend_on_batch_mates() -> None:
    class BatchCentred(_Lstsq):
        def _predict(self, x: Inputs) -> np.ndarray:
            pred = super()._predict(x)
            return pred - 0.1 * (pred - pred.mean())  # e.g. batch statistics left on at predict time

    with pytest.raises(AssertionError, match="depends on the rows predicted with it"):
        verify_learner(BatchCentred, _LstsqSettings())
