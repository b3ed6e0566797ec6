"""The base-learner protocol: fit on a feature matrix, predict, save and load in the library's native format.

Learners see numpy arrays only (plus, for learners that read text, a sparse TF-IDF matrix); assembling those from
the store's tables is `models.matrix`'s job and the cross-fitting loop is `models.train`'s.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from featurestore.config import Config

OBJECTIVES = ("huber", "l1", "l2")


@dataclass
class Inputs:
    dense: np.ndarray
    sparse: sp.csr_matrix | None = None

    def rows(self, index: np.ndarray) -> Inputs:
        return Inputs(self.dense[index], None if self.sparse is None else self.sparse[index])

    def __len__(self) -> int:
        return self.dense.shape[0]


class BaseLearner(ABC):
    """One model of one fold. `name` keys the registry and the `oof__<name>` table."""

    name: str
    # File name of a saved fold model, "{fold}" filled in (the extension says the format).
    file_pattern: str

    def __init__(self, config: Config, seed: int, feature_names: list[str], categorical: list[int]) -> None:
        self.config = config
        self.seed = seed
        self.feature_names = feature_names
        self.categorical = categorical
        self.best_iteration: int | None = None

    @property
    def wants_text(self) -> bool:
        """Learners that read the item text get its sparse TF-IDF matrix in Inputs.sparse."""
        return False

    @abstractmethod
    def fit(self, train: Inputs, y: np.ndarray, watch: Inputs, y_watch: np.ndarray) -> None:
        """Fit on `train`; `watch` (a slice of the training folds, never the validation fold) drives early stopping."""

    @abstractmethod
    def predict(self, x: Inputs) -> np.ndarray: ...

    @abstractmethod
    def save(self, path: Path) -> None: ...

    @abstractmethod
    def load(self, path: Path) -> None: ...

    def importance(self) -> dict[str, float]:
        """Gain importance per feature name (GBDTs); empty when the model has none."""
        return {}

    def recorded_params(self) -> dict[str, Any]:
        return {}


def check_objective(learner: str, objective: str) -> str:
    if objective not in OBJECTIVES:
        raise ValueError(f"models.{learner}.objective = {objective!r}; expected one of {OBJECTIVES}")
    return objective


def threads(config: Config) -> int:
    return config.models.threads or os.cpu_count() or 1


def save_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename, so a crash never leaves half a model file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the real suffix: XGBoost picks its format (JSON) from the extension.
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
