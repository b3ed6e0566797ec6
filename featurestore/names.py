"""Table names that more than one layer spells: one place, so a rename cannot miss a reader."""

from __future__ import annotations

ITEMS = "items"
FOLDS = "folds"
STACK_OOF = "stack_oof"
PREDICTIONS = "predictions"
OOF_PREFIX = "oof__"


def oof_table(learner: str) -> str:
    """`oof__<learner>`: a base learner's out-of-fold (train) and fold-mean (test) predictions."""
    return f"{OOF_PREFIX}{learner}"
