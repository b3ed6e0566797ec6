"""Plug-in learners that fail inside cross-fitting, for the CLI's error boundary (tests/test_errors.py):
`broken` has a bug (an IndexError: its traceback must show), `refusing` refuses its input with a UserError (one
line)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featurestore.errors import InputError
from models.base import BaseLearner, Inputs, LearnerSettings
from models.registry import register


@dataclass
class FailingSettings(LearnerSettings):
    tables: list[str] = field(default_factory=lambda: ["catalog"])


class _Failing(BaseLearner):
    file_pattern = "fold{fold}.failing.json"
    uses_early_stopping = False
    settings_type = FailingSettings

    def _predict(self, x: Inputs) -> np.ndarray:
        return np.zeros(len(x))

    def _save(self, path: Path) -> None:
        path.write_text("{}")

    def _load(self, path: Path) -> None:
        pass


@register
class BrokenLearner(_Failing):
    name = "broken"

    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        [][len(y)]  # a bug: IndexError


@register
class RefusingLearner(_Failing):
    name = "refusing"

    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        raise InputError("refusing: these rows cannot be used (a message written for the user)")


@dataclass
class KillingSettings(FailingSettings):
    kill_marker: str = ""  # a file holding how many more fits kill their process


@register
class KillingLearner(_Failing):
    """Kills its own worker process while `kill_marker` names a file holding a count above 0 (decremented per
    kill: the engine's retry test). Meant for Ray workers only: it would kill a local run."""

    name = "killing"
    settings_type = KillingSettings

    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        import os
        import signal

        marker = Path(self.settings.kill_marker)
        if self.settings.kill_marker and marker.is_file():
            left = int(marker.read_text() or "0")
            if left > 0:
                marker.write_text(str(left - 1))
                os.kill(os.getpid(), signal.SIGKILL)
        self.mean_ = float(np.mean(y))

    def _predict(self, x: Inputs) -> np.ndarray:
        return np.full(len(x), getattr(self, "mean_", 0.0))
