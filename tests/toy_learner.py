"""A plug-in learner kept outside models/, as a user would write one: one file, one `[models.toy]` section.

Shrunken least squares on the dense columns (missing values -> column mean), saved as JSON coefficients.
`tests/test_plugins.py` runs it through `train` and `stack` to prove the registry needs nothing else.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurestore.store import atomic_write
from models.base import BaseLearner, Inputs, LearnerSettings
from models.registry import register


@dataclass
class ToySettings(LearnerSettings):
    tables: list[str] = field(default_factory=lambda: ["catalog"])
    shrink: float = 1.0  # ridge penalty on the standardised columns
    sleep_s: float = 0.0  # a slow learner on demand: the time-limit tests stop it between folds


@register
class ToyLearner(BaseLearner):
    name = "toy"
    file_pattern = "fold{fold}.toy.json"
    uses_early_stopping = False
    settings_type = ToySettings

    def _design(self, x: Inputs) -> np.ndarray:
        dense = np.where(np.isnan(x.dense), self.mean_, x.dense)
        return (dense - self.mean_) / self.scale_

    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        time.sleep(self.settings.sleep_s)
        with np.errstate(all="ignore"):
            self.mean_ = np.nan_to_num(np.nanmean(train.dense, axis=0)).astype(np.float64)
            scale = np.nan_to_num(np.nanstd(train.dense, axis=0))
        self.scale_ = np.where(scale > 1e-9, scale, 1.0)
        design = self._design(train)
        gram = design.T @ design + self.settings.shrink * np.eye(design.shape[1])
        self.intercept_ = float(np.mean(y))
        self.coef_ = np.linalg.solve(gram, design.T @ (y - self.intercept_))

    def _predict(self, x: Inputs) -> np.ndarray:
        return self._design(x) @ self.coef_ + self.intercept_

    def _save(self, path: Path) -> None:
        state = {k: np.asarray(getattr(self, k)).tolist() for k in ("mean_", "scale_", "coef_", "intercept_")}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(state)))

    def _load(self, path: Path) -> None:
        for key, value in json.loads(path.read_text()).items():
            setattr(self, key, np.asarray(value, dtype=np.float64) if isinstance(value, list) else float(value))
