"""Table names that more than one layer spells: one place, so a rename cannot miss a reader."""

from __future__ import annotations

ITEMS = "items"
FOLDS = "folds"
STACK_OOF = "stack_oof"
PREDICTIONS = "predictions"
OOF_PREFIX = "oof__"


def learner_of(table: str) -> str:
    """The learner an `oof__<learner>` table belongs to."""
    if not table.startswith(OOF_PREFIX):
        raise ValueError(f"{table!r} is not a learner's table ({OOF_PREFIX}<learner>)")
    return table[len(OOF_PREFIX):]


def oof_table(learner: str) -> str:
    """`oof__<learner>`: a base learner's out-of-fold (train) and fold-mean (test) predictions."""
    return f"{OOF_PREFIX}{learner}"
