"""The one fold plan every out-of-fold computation follows (target encoding, kNN, learners, the stack).

`fold = -1` marks test rows. For each training fold k the plan yields (k, rows of fold k, rows of the other
folds); test rows are predicted or encoded once per fold from that fold's fitting rows and averaged, so a test row's
features have the same distribution as a training row's out-of-fold features (both see (k-1)/k of the labels).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def fold_plan(fold: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(k, query rows = fold k, fitting rows = training rows outside fold k), folds in ascending order."""
    train = fold >= 0
    for k in sorted(set(fold[train].tolist())):
        yield k, np.flatnonzero(fold == k), np.flatnonzero(train & (fold != k))


def n_folds(fold: np.ndarray) -> int:
    return len(set(fold[fold >= 0].tolist()))
