"""The run record of one `stack`: what it tried, chose and scored. One typed shape for the run record file
(`<store>/runs/stack-*.json`), the `predictions` manifest row, the CLI summary and the report."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from featurestore.errors import MissingTable, UserError
from featurestore.names import PREDICTIONS
from featurestore.store import FeatureStore

# Fields a record written before them lacks; read with their defaults (a stack made without a preset or a time limit).
ADDED_LATER = ("preset", "time_limit_s", "schedule")


@dataclass
class StackRecord:
    # -- the study and the levels (stacking.levels) --
    trials: int
    candidates: int
    nested: bool  # False: the reported stack_cv is the optimistic, non-nested one
    metas: list[str]
    best_meta: str  # the final meta-learner, chosen by the CV over all training rows
    best_params: dict[str, Any]
    metric: str  # what every score here measures (task.metric)
    final_cv: float  # the final choice's CV score (in-sample for the choice)
    stack_cv: float  # nested: each outer fold predicted by the candidate its own inner CV chose
    base_cv: dict[str, float]  # each base learner's out-of-fold score
    best_single_cv: float
    mean_blend_cv: float
    best_constant_cv: float  # the metric's best constant, fitted without each fold (the constant candidate)
    selection: str  # stacking.selection: how each CV picked its candidate
    selection_se: float
    outer_folds: dict[Any, dict[str, Any]]  # outer fold -> the candidate it chose, its inner CV
    meta_features: list[str]
    train_rows: int
    test_rows: int
    # -- the run (pipeline.stack) --
    study_key: str = ""
    stack_seconds: float = 0.0
    total_seconds: float = 0.0  # training of stale learners included
    peak_rss_mib: float = 0.0
    workers: int = 1
    learners: list[str] = field(default_factory=list)
    raw_features: list[str] = field(default_factory=list)
    base_learners: dict[str, Any] = field(default_factory=dict)  # oof table -> status, seconds, fold scores
    meta_model: str = ""  # the meta-learner file, relative to the store
    meta_sha256: str = ""
    submission: str | None = None  # None: no test rows
    run_record: str = ""  # this record's file
    preset: str = "best"  # the recipe the config was loaded with (pipeline.presets)
    # `--time-limit`: the budget in seconds (None: none) and what the schedule did with each learner, in the
    # order it took them: {"learner", "action" (trained | reused | skipped | stopped), "reason", "seconds"}.
    time_limit_s: float | None = None
    schedule: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, store: FeatureStore) -> StackRecord:
        """The record of the stack whose predictions the store holds."""
        info = store.info(PREDICTIONS)
        if info is None:
            raise MissingTable(f"no stack in {store.root}; run `python cli.py stack` first")
        missing = [f.name for f in fields(cls) if f.name not in info.extra and f.name not in ADDED_LATER]
        if missing:
            raise UserError(f"the stack in {store.root} was made by an older version (no {', '.join(missing)} in its "
                            "record); rerun `python cli.py stack`")
        return cls(**{f.name: info.extra[f.name] for f in fields(cls) if f.name in info.extra})
