"""A plug-in meta-learner kept outside stacking/, as a user would write one: one module with a @register_meta class,
named in `[models] plugins`. The median of the base predictions in log space (robust to one bad learner).
`tests/test_plugins.py` stacks it through the CLI; the meta contract test covers it through the registry."""

from __future__ import annotations

from typing import Any

import numpy as np

from stacking.meta import MetaLearner, register_meta


@register_meta
class MedianMeta(MetaLearner):
    name = "toy_median"

    def _fit(self, x: np.ndarray, y: np.ndarray, valid: list[tuple[np.ndarray, np.ndarray]] | None) -> object:
        return self

    def _predict(self, x: np.ndarray, at: int | None) -> np.ndarray:
        return np.median(x[:, : self.n_base], axis=1)

    def _state(self) -> dict[str, Any]:
        return {}

    def _set_state(self, state: dict[str, Any]) -> None:
        pass
