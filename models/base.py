"""The base-learner protocol: fit on a feature matrix, predict, save and load in the library's native format.

Learners see `Inputs` only: a dense float32 block (parsed fields, encodings, embeddings) and, for learners that
read sparse tables, a scipy CSR block (`text_sparse`). Assembling those from the store's tables is
`models.matrix`'s job; the cross-fitting loop is `models.train`'s and names no learner.

Like scikit-learn's estimators: the constructor stores settings, `fit` does the work (validate -> `_fit`), fitted
state ends in `_`. Like AutoGluon's models: capabilities are class attributes and `register` keys the registry
by `name`, refusing duplicates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from featurestore.config import choice
from featurestore.errors import ConfigError

OBJECTIVES = ("huber", "l1", "l2")
# "auto": the loss the task's metric calls for (models.metrics: smape -> huber, mape/mae -> l1, rmse/rmsle -> l2).
AUTO = "auto"


@dataclass
class LearnerSettings:
    """What every `[models.<name>]` section has; each learner's settings dataclass extends it (beside the learner:
    models/learners/, or a plug-in's module)."""

    # Feature set: tables joined on sample_id (DuckDB). Strings become categories when few enough, else dropped.
    tables: list[str] = field(default_factory=list)


@dataclass
class WithObjective(LearnerSettings):
    """Settings of a learner that fits a chosen loss on the transformed target."""

    objective: str = choice("auto", "huber", "l1", "l2")  # auto: the loss task.metric calls for


@dataclass
class Inputs:
    dense: np.ndarray
    sparse: sp.csr_matrix | None = None
    # Row weights for fitting (None: all equal). Set from the task's metric (MAPE: 1/y); only learners with
    # `supports_weights` read them.
    weight: np.ndarray | None = None
    # The items' labelled text (object array of str), for learners with `reads_text` (the fine-tuned regressor).
    text: np.ndarray | None = None

    def rows(self, index: np.ndarray) -> Inputs:
        return Inputs(self.dense[index], None if self.sparse is None else self.sparse[index],
                      None if self.weight is None else self.weight[index],
                      None if self.text is None else self.text[index])

    def __len__(self) -> int:
        return self.dense.shape[0]

    def combined(self) -> np.ndarray | sp.csr_matrix:
        """Dense columns then sparse columns, as CSR when there is a sparse block (never densified)."""
        if self.sparse is None:
            return self.dense
        return sp.hstack([sp.csr_matrix(self.dense), self.sparse], format="csr", dtype=np.float32)


class NotFittedError(RuntimeError):
    """`predict`, `save` or `importance` before `fit` or `load`."""


class BaseLearner(ABC):
    """One model of one fold. `name` keys the registry, the `[models.<name>]` settings and `oof__<name>`."""

    name: ClassVar[str]
    # File name of a saved fold model, "{fold}" filled in (the extension says the format).
    file_pattern: ClassVar[str]
    # Whether sparse tables (text_sparse) may be in its feature set; they arrive in Inputs.sparse.
    reads_sparse: ClassVar[bool] = False
    # Learners that early-stop get a watch slice of the fold's training rows; the others train on all of them.
    uses_early_stopping: ClassVar[bool] = True
    # The settings dataclass its `[models.<name>]` section is validated into (extends LearnerSettings).
    settings_type: ClassVar[type[LearnerSettings]] = LearnerSettings
    # Whether fitting honours Inputs.weight (the metric's row weights); cross-fitting records it either way.
    supports_weights: ClassVar[bool] = False
    # Whether it reads the items' text (Inputs.text) rather than, or beside, feature tables.
    reads_text: ClassVar[bool] = False
    # Whether a crashed cross-fit resumes at the first fold without a saved model (for learners whose folds take
    # long; their `save` must be atomic and `load` must restore best_iteration_).
    resumes_folds: ClassVar[bool] = False

    def __init__(self, settings: Any, seed: int, threads: int, feature_names: list[str],
                 categorical: list[int], name: str | None = None) -> None:
        if name is not None:  # a variant (models.registry.variant_base) runs under its own name
            self.name = name
        self.settings = settings
        self.seed = seed
        self.threads = threads
        self.feature_names = feature_names
        self.categorical = categorical
        self.best_iteration_: int | None = None
        self.fitted_ = False

    @classmethod
    def default_settings(cls) -> LearnerSettings:
        """The settings before its section is applied (a learner may start from other defaults than its type's)."""
        return cls.settings_type()

    @classmethod
    def sparse_column_cap(cls, settings: LearnerSettings) -> int:
        """How many columns of each sparse table it reads (most frequent first); 0 = all."""
        return 0

    @classmethod
    def fitted_objective(cls, settings: LearnerSettings) -> str:
        """The loss it fits, for the record ("l2" for a learner without an objective setting)."""
        return settings.objective if isinstance(settings, WithObjective) else "l2"

    # -- template methods ---------------------------------------------------------------------------
    def fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None = None, y_watch: np.ndarray | None = None
            ) -> BaseLearner:
        """Fit on `train`; `watch` (a slice of the fold's training rows, never the validation fold) drives early
        stopping for learners that use it."""
        self._check_inputs(train, "train")
        if len(train) != len(y) or len(train) == 0:
            raise ValueError(f"{self.name}: {len(train)} training rows but {len(y)} targets")
        if not np.all(np.isfinite(y)):
            raise ValueError(f"{self.name}: the training target has non-finite values")
        if self.uses_early_stopping:
            if watch is None or y_watch is None or len(watch) == 0:
                raise ValueError(f"{self.name} early-stops and needs a non-empty watch slice")
            self._check_inputs(watch, "watch")
        self._fit(train, y, watch, y_watch)
        self.fitted_ = True
        return self

    def predict(self, x: Inputs) -> np.ndarray:
        self._require_fitted("predict")
        self._check_inputs(x, "predict")
        return np.asarray(self._predict(x), dtype=np.float64)

    def save(self, path: Path) -> None:
        self._require_fitted("save")
        self._save(path)

    def load(self, path: Path) -> BaseLearner:
        self._load(path)
        self.fitted_ = True
        return self

    def importance(self) -> dict[str, float]:
        """Gain importance per feature name; empty when the model has none."""
        self._require_fitted("importance")
        return self._importance()

    # -- what a learner implements --------------------------------------------------------------------
    @abstractmethod
    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None: ...

    @abstractmethod
    def _predict(self, x: Inputs) -> np.ndarray: ...

    @abstractmethod
    def _save(self, path: Path) -> None: ...

    @abstractmethod
    def _load(self, path: Path) -> None: ...

    def _importance(self) -> dict[str, float]:
        return {}

    def recorded_params(self) -> dict[str, Any]:
        return {}

    @property
    def best_iteration(self) -> int | None:
        return self.best_iteration_

    # -- checks ---------------------------------------------------------------------------------------
    def _require_fitted(self, what: str) -> None:
        if not self.fitted_:
            raise NotFittedError(f"{self.name}: {what} before fit (or load)")

    def _check_inputs(self, x: Inputs, where: str) -> None:
        if self.reads_text and (x.text is None or len(x.text) != x.dense.shape[0]):
            raise ValueError(f"{self.name} ({where}) reads the item text, but Inputs.text is missing or has another "
                             "row count than the dense block")
        if x.sparse is not None and not self.reads_sparse:
            raise ConfigError(f"{self.name} does not read sparse tables; take text_sparse out of its tables")
        if x.sparse is not None and x.sparse.shape[0] != x.dense.shape[0]:
            raise ValueError(f"{self.name} ({where}): dense and sparse blocks have different row counts")
        if self.feature_names and x.dense.shape[1] + (0 if x.sparse is None else x.sparse.shape[1]) != len(
                self.feature_names):
            raise ValueError(f"{self.name} ({where}): {x.dense.shape[1]} dense + "
                             f"{0 if x.sparse is None else x.sparse.shape[1]} sparse columns, but the learner was "
                             f"built for {len(self.feature_names)} features")


def check_objective(learner: str, objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ConfigError(f"models.{learner}.objective must be one of {', '.join(OBJECTIVES)}; got {objective!r} "
                         "(\"auto\" is resolved from task.metric by models.train.resolved_settings)")
    return objective


