"""Table names that more than one layer spells: one place, so a rename cannot miss a reader."""

from __future__ import annotations

import re

ITEMS = "items"
FOLDS = "folds"
STACK_OOF = "stack_oof"
PREDICTIONS = "predictions"
OOF_PREFIX = "oof__"


TEXT_EMB_PREFIX = "text_emb__"
IMAGE_EMB_PREFIX = "image_emb__"
KNN_PREFIX = "knn__"


def text_emb_table(model: str) -> str:
    """`text_emb__<model>`: a text encoder's vectors; a hub name or folder keeps its last part, made safe."""
    safe = "".join(ch if ch.isalnum() else "_" for ch in model.split("/")[-1].lower())
    return f"{TEXT_EMB_PREFIX}{safe}"


def image_emb_table(alias: str) -> str:
    """`image_emb__<alias>`: the configured image encoder's vectors."""
    return f"{IMAGE_EMB_PREFIX}{alias}"


def knn_table(space: str) -> str:
    """`knn__<space>` for a search space: `text_emb__minilm` -> `knn__text_minilm`, `concat` -> `knn__concat`."""
    return f"{KNN_PREFIX}{knn_space_name(space)}"


def knn_space_name(space: str) -> str:
    return space.replace("_emb__", "_")


def learner_of(table: str) -> str:
    """The learner an `oof__<learner>` table belongs to."""
    if not table.startswith(OOF_PREFIX):
        raise ValueError(f"{table!r} is not a learner's table ({OOF_PREFIX}<learner>)")
    return table[len(OOF_PREFIX):]


def oof_table(learner: str) -> str:
    """`oof__<learner>`: a base learner's out-of-fold (train) and fold-mean (test) predictions."""
    return f"{OOF_PREFIX}{learner}"


MANIFEST = "manifest"
# Tables that hold the target, the fold plan or predictions. None of them is ever a feature: a learner reading
# `items` saw items.price (lgbm "CV" 8.88 SMAPE on its own labels, submission prices 1.8-3.0), and a learner or a
# raw stack feature reading `folds`, an `oof__` table or the stack's outputs mixes levels of the stack.
NON_FEATURE_TABLES = (ITEMS, FOLDS, STACK_OOF, PREDICTIONS, MANIFEST)
# Columns of `items` that carry the label or the fold plan, in whatever table they would appear.
LABEL_COLUMNS = ("price", "fold", "split", "group_id")
_PLAIN = re.compile(r"^[A-Za-z0-9_-]+$")


def bare_name(name: str) -> str:
    """What DuckDB would resolve `name` to: quotes, spaces and case do not change which table is meant."""
    return name.strip().strip('"').strip().lower()


def feature_table_problem(name: object) -> str | None:
    """Why `name` cannot be read as a feature table (None when it can): not a plain name, or a table that holds
    the target, the folds or predictions, however it is spelled (`ITEMS`, `"items"`, `main.items`, ` items`)."""
    if not isinstance(name, str):
        return f"{name!r} is not a table name"
    bare = bare_name(name)
    last = bare.rsplit(".", 1)[-1].strip().strip('"')
    if last in NON_FEATURE_TABLES or last.startswith(OOF_PREFIX) or bare in NON_FEATURE_TABLES:
        return (f"{name!r} holds the target, the fold plan or predictions, never features; learners and raw stack "
                "features read feature tables only (catalog, target_enc, text_sparse, text_emb__*, knn__*, ...)")
    if not _PLAIN.match(name):
        return f"{name!r} is not a plain table name (letters, digits, '_' or '-'; no schema, quotes or spaces)"
    return None


def label_column_problem(column: str, target: str = "price") -> str | None:
    """Why a feature column named `column` would carry the label (None when it would not)."""
    bare = bare_name(column)
    if bare in LABEL_COLUMNS or bare == bare_name(target):
        return f"column {column!r} is the target or the fold plan, never a feature"
    return None
