"""`stack` as the CLI runs it: check the settings, tune over the trained learners' OOF tables, then write
`stack_oof`, `predictions`, the submission and a run record, in that order and only after everything is checked."""

from __future__ import annotations

import json
import logging
import os
import resource
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import optuna
import polars as pl
from threadpoolctl import threadpool_limits

from featurestore.budget import Budget
from featurestore.builders import BuildResult
from featurestore.config import Config
from featurestore.devices import threads
from featurestore.engine import Engine
from featurestore.errors import ConfigError, InputError
from featurestore.names import (
    PREDICTIONS,
    STACK_OOF,
    learner_of,
)
from featurestore.store import FeatureStore, Timer, atomic_write, file_sha256
from models.train import TrainedLearner
from stacking.artifacts import check_submission, save_meta, stack_key, write_submission
from stacking.inputs import META_THREADS, meta_frame, stack_inputs
from stacking.journal import journal_storage
from stacking.levels import run_levels
from stacking.meta import meta_class
from stacking.record import StackRecord

log = logging.getLogger(__name__)


def check_stack_settings(config: Config) -> None:
    """What would otherwise fail only after the base learners trained (minutes to hours): no learners, an
    unknown learner or meta-learner name."""
    from models.registry import learner_class, load_plugins

    load_plugins(config)
    if not config.models.learners:
        raise ConfigError("models.learners is empty; name at least one learner, e.g. learners = [\"lgbm\"]")
    for name in config.models.learners:
        learner_class(name, config)
    for name in config.stacking.metas:
        meta_class(name)


# Of a time limit, the share kept after the candidates for the stack's own tail: the nested refits, the final fit,
# the checks and the writes (a few seconds on Mercari's 55k rows).
STACK_TAIL = (2.0, 0.02)  # seconds, fraction of the limit: the larger is kept


def _study_deadline(budget: Budget | None) -> float | None:
    if budget is None:
        return None
    return budget.deadline - max(STACK_TAIL[0], STACK_TAIL[1] * budget.seconds)


def run_stack(store: FeatureStore, config: Config, trials: int, built: list[BuildResult],
              train_seconds: float = 0.0, engine: Engine | None = None, budget: Budget | None = None,
              schedule: list[dict[str, Any]] | None = None) -> StackRecord:
    """Run the studies over the trained learners' OOF tables (`built`: how each was trained, for the record);
    write stack_oof, predictions, submission.csv and a run record. `budget`: candidates stop being evaluated when
    it runs out (the baselines are always scored); `schedule`: what a time limit did with each learner."""
    check_stack_settings(config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with Timer() as total:
        learners = list(config.models.learners)
        frame = meta_frame(store, learners, config.stacking.raw_features)
        inputs = stack_inputs(frame, learners, config.stacking.raw_features, config.task.metric)
        key = stack_key(store, config)
        with Timer() as timer:
            # The refits in this process run with the workers' one BLAS thread, so they reproduce the evaluated
            # fits bit for bit.
            with threadpool_limits(limits=META_THREADS):
                result = run_levels(inputs, config, trials, journal_storage(store), key, workers=threads(config),
                                    engine=engine, deadline=_study_deadline(budget))
    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    record = replace(
        result.record, study_key=key, stack_seconds=round(timer.seconds, 2),
        total_seconds=round(train_seconds + total.seconds, 2), peak_rss_mib=round(peak_kib / 1024, 1),
        workers=threads(config), learners=learners, raw_features=list(config.stacking.raw_features),
        base_learners={b.table: {"status": b.status, "seconds": round(b.seconds, 2),
                                 "fold_scores": TrainedLearner.of(store, learner_of(b.table)).fold_scores}
                       for b in built},
        preset=config.preset, time_limit_s=None if budget is None else budget.seconds, schedule=schedule or [])
    train_rows, test_rows = inputs.fold >= 0, inputs.fold < 0
    # Everything is checked before anything is committed: a NaN meta-prediction or a bad submission must not
    # leave stack_oof / predictions tables behind (they were written before the submission check failed).
    for what, values in (("nested out-of-fold", result.meta_oof[train_rows]), ("test", result.test_pred)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise InputError(f"the stack's {result.final_name} meta-learner gave {bad} non-finite {what} "
                             "predictions; nothing was written (check the base learners' oof__ tables)")
    price = np.clip(np.expm1(result.test_pred), 0.01, None)
    check_submission(inputs.ids[test_rows], price, inputs.ids[test_rows])
    meta_path = store.models_dir("stack") / f"{key}.json"
    save_meta(meta_path, result, inputs)
    record.meta_model = str(meta_path.relative_to(store.root))
    record.meta_sha256 = file_sha256(meta_path)
    fingerprint = f"{key}-t{trials}"
    stack_oof = pl.DataFrame({"sample_id": inputs.ids[train_rows], "fold": inputs.fold[train_rows],
                              "pred_log": result.meta_oof[train_rows],
                              "pred_price": np.expm1(result.meta_oof[train_rows])})
    store.write(STACK_OOF, stack_oof, builder="Stacker", params={"trials": trials, "key": key},
                fingerprint=fingerprint, seconds=timer.seconds,
                extra={"metric": record.metric, "stack_cv": record.stack_cv})
    predictions = pl.DataFrame({"sample_id": inputs.ids[test_rows], "price": price})
    store.write(PREDICTIONS, predictions, builder="Stacker", params={"trials": trials, "key": key},
                fingerprint=fingerprint, seconds=timer.seconds, extra=record.to_dict())
    if predictions.height:
        submission_path = store.root / config.stacking.submission
        write_submission(submission_path, inputs.ids[test_rows], price, inputs.ids[test_rows])
        record.submission = str(submission_path)
    runs = store.runs_dir
    runs.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    run_path = runs / f"stack-{stamp}-{os.getpid()}.json"
    record.run_record = str(run_path)
    atomic_write(run_path, lambda tmp: tmp.write_text(json.dumps(record.to_dict(), indent=2, default=str)))
    return record
