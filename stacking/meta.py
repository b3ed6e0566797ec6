"""Meta-learners: combine the base learners' log-price predictions (plus a few raw features) into one.

Each has an Optuna search space (`suggest`, its parameters prefixed by its name), fits on numpy arrays in
milliseconds (the stack fits each candidate 15 times), and saves itself as JSON (the LightGBM one embeds
LightGBM's own text model format), so a stored stack is never unpickled.

`mean` (the plain mean of the base predictions), `single` (the base learner with the best score on the fit rows)
and `constant` (the metric's best constant on the fit rows) have no parameters: they are always candidates, so
the nested CV can choose them when a fitted meta overfits, and the selection rule (stacking.selection) prefers
them when a fitted meta is not clearly better.

Predictions are computed row by row (elementwise products summed per row, not BLAS matvec, whose blocking depends
on the row count): a row's prediction must not depend on its batch-mates, so `predict` on a few rows equals the
pipeline's own numbers bit for bit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import optuna

from featurestore.errors import ConfigError
from models.base import NotFittedError
from models.metrics import best_constant, metric


class MetaLearner(ABC):
    """Like the base learners (models.base): the constructor stores settings, `fit` does the work through `_fit`,
    fitted state ends in `_`, `predict`/`state` before `fit` (or `set_state`) is a NotFittedError."""

    name: ClassVar[str]
    # A parameter read off held-out curves instead of being searched (LightGBM's round count); None for others.
    curve_param: ClassVar[str | None] = None
    # Share of the random candidates this meta gets, relative to the others (data-independent): a LightGBM
    # candidate costs ~10x a ridge or blend one, so it gets fewer draws.
    candidate_weight: ClassVar[int] = 1
    # Always a candidate, whatever stacking.metas says (no parameters; candidates 0, 1, ... in registration
    # order): the simple candidates a fitted meta must beat.
    baseline: ClassVar[bool] = False
    # Rank for the selection rule's "simpler" (stacking.selection = "one_se"): among candidates within one
    # standard error of the best, the lowest complexity wins. Data-free, so the rule stays out of fold.
    complexity: ClassVar[int] = 2

    def __init__(self, params: dict[str, Any], n_base: int, seed: int, threads: int = 1, metric: str = "smape"
                 ) -> None:
        self.params = params
        self.n_base = n_base  # the first n_base columns are base-learner predictions (log1p price)
        self.seed = seed
        self.threads = threads
        self.metric = metric  # the task's metric (models.metrics): what `single` picks by
        # Row weights of the fit rows, from the metric (MAPE: 1/y); None = equal. Set by fit_rows.
        self.weight_: np.ndarray | None = None
        self.fitted_ = False

    @staticmethod
    def suggest(trial: optuna.Trial) -> dict[str, Any]:
        return {}

    def fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        """Fit; metas with a `curve_param` also record `curves_` (held-out L1 per round, one per valid set)."""
        self._fit(x, y, valid)
        self.fitted_ = True
        return self

    def fit_rows(self, x: np.ndarray, y: np.ndarray, rows: np.ndarray, valid: list[np.ndarray] | None = None,
                 weight: np.ndarray | None = None) -> MetaLearner:
        """Fit on `rows` of the whole meta matrix (the stack's calling convention; metas may cache per matrix).
        `weight`: row weights of the whole matrix, or None."""
        self.weight_ = None if weight is None else weight[rows]
        return self.fit(x[rows], y[rows], None if valid is None else [(x[v], y[v]) for v in valid])

    def predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        """log1p-price predictions; `at` = the curve parameter's value (rounds) for metas that have one."""
        self._require_fitted("predict")
        return self._predict(x, at)

    def state(self) -> dict[str, Any]:
        """The fitted state as JSON-able data (the stored meta-learner file)."""
        self._require_fitted("state")
        return self._state()

    def set_state(self, state: dict[str, Any]) -> MetaLearner:
        self._set_state(state)
        self.fitted_ = True
        return self

    def _require_fitted(self, what: str) -> None:
        if not self.fitted_:
            raise NotFittedError(f"meta-learner {self.name}: {what} before fit (or set_state)")

    @abstractmethod
    def _fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None) -> object: ...

    @abstractmethod
    def _predict(self, x: np.ndarray, at: int | None) -> np.ndarray: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _set_state(self, state: dict[str, Any]) -> None: ...


METAS: dict[str, type[MetaLearner]] = {}


def register_meta(cls: type[MetaLearner]) -> type[MetaLearner]:
    """Class decorator: adds a meta-learner under `cls.name`; a second class with the same name is refused."""
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").isalnum():
        raise ConfigError(f"{cls.__name__}.name = {name!r}; expected letters, digits and '_'")
    taken = METAS.get(name)
    if taken is not None and taken is not cls:
        raise ConfigError(f"meta-learner name {name!r} is taken by {taken.__module__}.{taken.__name__}; give "
                          f"{cls.__module__}.{cls.__name__} another `name`")
    METAS[name] = cls
    return cls


def meta_class(name: str) -> type[MetaLearner]:
    if name not in METAS:
        raise ConfigError(f"unknown meta-learner {name!r}; known: {', '.join(sorted(METAS))}")
    return METAS[name]


def baseline_metas() -> tuple[str, ...]:
    """The metas that are always candidates, in registration order (their candidate indexes)."""
    return tuple(name for name, cls in METAS.items() if cls.baseline)


def _rowdot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (x * w).sum(axis=1)


@register_meta
class MeanMeta(MetaLearner):
    """The plain mean of the base predictions in log space (a geometric mean of prices)."""

    name = "mean"
    baseline = True
    complexity = 1

    def _fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        return self

    def _predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        return x[:, : self.n_base].mean(axis=1)

    def _state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        pass


@register_meta
class SingleMeta(MetaLearner):
    """The one base learner with the best score (the task's metric) on the fit rows."""

    name = "single"
    baseline = True
    # A choice fitted on the rows (one of n learners), unlike the mean: as complex as a blend's weights.

    def _fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        price = np.expm1(y)
        score = metric(self.metric).score
        scores = [score(price, np.expm1(x[:, i])) for i in range(self.n_base)]
        self.column_ = int(np.argmin(scores))
        return self

    def _predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        return x[:, self.column_].copy()

    def _state(self) -> dict[str, Any]:
        return {"column": self.column_}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.column_ = int(state["column"])


@register_meta
class ConstantMeta(MetaLearner):
    """The metric's best constant on the fit rows (models.metrics.best_constant): the floor every stack must beat
    (under MAPE the 1/y-weighted median, which beat every learner on the 2023 length task)."""

    name = "constant"
    baseline = True
    complexity = 0

    def _fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None = None
            ) -> MetaLearner:
        self.value_ = float(np.log1p(best_constant(self.metric, np.expm1(y))))
        return self

    def _predict(self, x: np.ndarray, at: int | None = None) -> np.ndarray:
        return np.full(len(x), self.value_)

    def _state(self) -> dict[str, Any]:
        return {"value": self.value_}

    def _set_state(self, state: dict[str, Any]) -> None:
        self.value_ = float(state["value"])


# The built-in fitted metas register themselves (a plug-in meta is a module named in models.plugins).
from stacking import meta_lgbm, meta_linear  # noqa: E402,F401
