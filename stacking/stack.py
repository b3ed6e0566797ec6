"""The stack: an Optuna study picks the meta-learner and its hyper-parameters over the base learners' OOF
predictions, scored by a second level of cross-validation on the same folds.

Leak rules. Level 1: a row's OOF prediction comes from the fold model that never saw it. Level 2: the
meta-learner that predicts fold k is fitted on the other folds' rows only. Nested (default): fold k's
meta-learner is also *chosen* (Optuna study) without fold k's rows, so the stack's reported CV SMAPE is scored
on data its tuning never saw; many trials over OOF predictions otherwise overfit. The final meta-learner is
tuned and fitted on all training rows and predicts the test rows.

Studies live in `<store>/optuna.journal` (Optuna's journal file storage), named by a key of their inputs: a
rerun after a crash resumes a study and runs only the trials still missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import polars as pl

from featurestore.config import Config
from featurestore.store import FeatureStore, Timer, atomic_write, quote_ident
from models.base import threads
from models.matrix import left_join, query_items
from models.metrics import smape
from stacking.meta import MetaLearner, meta_class

log = logging.getLogger(__name__)

JOURNAL = "optuna.journal"


@dataclass
class StackInputs:
    ids: np.ndarray
    fold: np.ndarray  # -1 on test rows
    price: np.ndarray  # NaN on test rows
    x: np.ndarray  # base predictions (log1p price) first, then raw features
    feature_names: list[str]
    n_base: int

    @property
    def y(self) -> np.ndarray:
        return np.log1p(self.price)


def meta_frame(store: FeatureStore, learners: list[str], raw_features: list[str]) -> pl.DataFrame:
    """items + folds + each learner's pred_log + raw features, joined by DuckDB, ordered by sample_id."""
    select: list[str] = []
    joins = []
    for n, learner in enumerate(learners):
        table = f"oof__{learner}"
        if not store.has_table(table):
            raise FileNotFoundError(f"table {table} is missing; `python cli.py stack` trains it")
        select.append(f"o{n}.pred_log AS {quote_ident(learner)}")
        joins.append(left_join(table, f"o{n}"))
    raw_tables: dict[str, str] = {}
    for feature in raw_features:
        table, _, column = feature.partition(".")
        if not column:
            raise ValueError(f"stacking.raw_features: {feature!r}; expected 'table.column'")
        if not store.has_table(table):
            raise FileNotFoundError(f"stacking.raw_features names {feature!r}, but table {table} is not built")
        if column not in pl.read_parquet_schema(store.table_path(table)):
            raise ValueError(f"stacking.raw_features names {feature!r}, but {table} has no column {column!r}")
        if table not in raw_tables:
            raw_tables[table] = f"r{len(raw_tables)}"
            joins.append(left_join(table, raw_tables[table]))
        select.append(f"{raw_tables[table]}.{quote_ident(column)}::DOUBLE AS {quote_ident(feature)}")
    return query_items(store, select, joins)


def stack_inputs(frame: pl.DataFrame, learners: list[str], raw_features: list[str]) -> StackInputs:
    names = [*learners, *raw_features]
    return StackInputs(
        ids=frame["sample_id"].to_numpy(), fold=frame["fold"].to_numpy(),
        price=frame["price"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
        x=frame.select(pl.col(names).cast(pl.Float64)).to_numpy(), feature_names=names, n_base=len(learners))


def make_meta(name: str, params: dict[str, Any], inputs: StackInputs, config: Config) -> MetaLearner:
    return meta_class(name)(params, inputs.n_base, config.stacking.seed, threads(config))


def cv_predict(name: str, params: dict[str, Any], inputs: StackInputs, rows: np.ndarray, config: Config,
               after_fold: Callable[[int, float], None] | None = None) -> np.ndarray:
    """Level-2 CV restricted to `rows` (train rows): each of their folds predicted by a meta-learner fitted on
    the others. Returns log1p-price predictions for `rows`. `after_fold(step, smape_so_far)` lets Optuna prune a
    trial that is already worse than the median after its first folds."""
    out = np.full(len(rows), np.nan)
    row_fold = inputs.fold[rows]
    done = np.zeros(len(rows), dtype=bool)
    for step, k in enumerate(sorted(set(row_fold.tolist()))):
        fit, held = rows[row_fold != k], row_fold == k
        if len(fit) == 0:
            continue
        meta = make_meta(name, params, inputs, config)
        meta.fit(inputs.x[fit], inputs.y[fit])
        out[held] = meta.predict(inputs.x[rows[held]])
        done |= held
        if after_fold is not None:
            after_fold(step, smape(inputs.price[rows[done]], np.expm1(out[done])))
    return out


def _params_of(trial: optuna.trial.FrozenTrial | optuna.Trial, meta: str) -> dict[str, Any]:
    prefix = f"{meta}_"
    return {k[len(prefix):]: v for k, v in trial.params.items() if k.startswith(prefix)}


def tune(study_name: str, inputs: StackInputs, rows: np.ndarray, config: Config, trials: int,
         storage: optuna.storages.BaseStorage | None, seed: int, progress: bool = False) -> optuna.Study:
    """An Optuna study over (meta-learner, its hyper-parameters) minimising level-2 CV SMAPE on `rows`."""
    metas = list(config.stacking.metas)
    for name in metas:
        meta_class(name)

    def objective(trial: optuna.Trial) -> float:
        meta = trial.suggest_categorical("meta", metas)
        params = meta_class(meta).suggest(trial)

        def after_fold(step: int, value: float) -> None:
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        pred = cv_predict(meta, params, inputs, rows, config, after_fold if config.stacking.pruning else None)
        return smape(inputs.price[rows], np.expm1(pred))

    # Median pruning: a trial worse than the median of earlier trials after the same folds stops early.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=10) if config.stacking.pruning else None
    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner, load_if_exists=True)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = sum(t.state in finished for t in study.trials)
    if trials - done > 0:
        study.optimize(objective, n_trials=trials - done, show_progress_bar=progress)
    return study


def best_of(study: optuna.Study) -> tuple[str, dict[str, Any]]:
    meta = study.best_trial.params["meta"]
    return meta, _params_of(study.best_trial, meta)


@dataclass
class StackResult:
    meta_oof: np.ndarray  # log1p-price meta-predictions of train rows (nested: tuned without their fold)
    test_pred: np.ndarray  # log1p-price predictions of test rows by the final meta-learner
    final_meta: MetaLearner
    final_name: str
    final_params: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)


def run_levels(inputs: StackInputs, config: Config, trials: int, storage: optuna.storages.BaseStorage | None,
               key: str, progress: bool = False) -> StackResult:
    """Nested level-2 CV (honest stack score) + the final meta-learner. Pure given its inputs: no store I/O."""
    seed = config.stacking.seed
    train_rows = np.flatnonzero(inputs.fold >= 0)
    test_rows = np.flatnonzero(inputs.fold < 0)
    folds = sorted(set(inputs.fold[train_rows].tolist()))
    meta_oof = np.full(len(inputs.ids), np.nan)
    outer: dict[int, dict[str, Any]] = {}
    if config.stacking.nested:
        for k in folds:
            rows = train_rows[inputs.fold[train_rows] != k]
            study = tune(f"{key}-outer{k}", inputs, rows, config, trials, storage, seed + 1 + k, progress)
            name, params = best_of(study)
            meta = make_meta(name, params, inputs, config)
            meta.fit(inputs.x[rows], inputs.y[rows])
            held = train_rows[inputs.fold[train_rows] == k]
            meta_oof[held] = meta.predict(inputs.x[held])
            outer[k] = {"meta": name, "params": params, "inner_cv_smape": round(study.best_value, 4)}
    final = tune(f"{key}-final", inputs, train_rows, config, trials, storage, seed, progress)
    name, params = best_of(final)
    if not config.stacking.nested:  # optimistic: the same data chose the params; flagged in the record
        meta_oof[train_rows] = cv_predict(name, params, inputs, train_rows, config)
    meta = make_meta(name, params, inputs, config)
    meta.fit(inputs.x[train_rows], inputs.y[train_rows])
    test_pred = meta.predict(inputs.x[test_rows]) if len(test_rows) else np.zeros(0)
    price = inputs.price[train_rows]
    base_smape = {n: round(smape(price, np.expm1(inputs.x[train_rows, i])), 4)
                  for i, n in enumerate(inputs.feature_names[: inputs.n_base])}
    mean_blend = np.expm1(inputs.x[train_rows, : inputs.n_base].mean(axis=1))
    record = {
        "trials": trials, "nested": config.stacking.nested, "metas": list(config.stacking.metas),
        "best_meta": name, "best_params": params, "final_study_best_cv_smape": round(final.best_value, 4),
        "stack_cv_smape": round(smape(price, np.expm1(meta_oof[train_rows])), 4),
        "base_cv_smape": base_smape, "mean_blend_cv_smape": round(smape(price, mean_blend), 4),
        "outer_folds": outer, "meta_features": inputs.feature_names, "train_rows": len(train_rows),
        "test_rows": len(test_rows),
    }
    return StackResult(meta_oof, test_pred, meta, name, params, record)


def stack_key(store: FeatureStore, config: Config) -> str:
    payload = {"oof": {n: store.info(f"oof__{n}").fingerprint for n in config.models.learners},  # type: ignore[union-attr]
               "raw": config.stacking.raw_features, "metas": config.stacking.metas, "seed": config.stacking.seed,
               "nested": config.stacking.nested}
    return "stack-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def journal_storage(store: FeatureStore) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(store.root / JOURNAL)))


def save_meta(path: Path, result: StackResult, inputs: StackInputs) -> None:
    payload = {"meta": result.final_name, "params": result.final_params, "n_base": inputs.n_base,
               "feature_names": inputs.feature_names, "state": result.final_meta.state()}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload)))


def load_meta(path: Path, config: Config) -> tuple[MetaLearner, list[str]]:
    payload = json.loads(path.read_text())
    meta = meta_class(payload["meta"])(payload["params"], payload["n_base"], config.stacking.seed, threads(config))
    meta.set_state(payload["state"])
    return meta, payload["feature_names"]


def write_submission(path: Path, ids: np.ndarray, price: np.ndarray, expected_ids: np.ndarray) -> pl.DataFrame:
    """The challenge format (sample_id,price): every test id exactly once, finite positive prices."""
    submission = pl.DataFrame({"sample_id": ids, "price": price})
    if submission["sample_id"].n_unique() != submission.height or set(ids.tolist()) != set(expected_ids.tolist()):
        raise RuntimeError("submission ids do not match the test ids one to one")
    if not np.all(np.isfinite(price)) or np.any(price <= 0):
        raise RuntimeError("submission has non-finite or non-positive prices")
    atomic_write(path, lambda tmp: submission.write_csv(tmp))
    return submission


def run_stack(store: FeatureStore, config: Config, trials: int, progress: bool = True) -> dict[str, Any]:
    """Train stale base learners, run the studies, write stack_oof, predictions, submission.csv and a run record."""
    from features.base import BuildContext, run_builders
    from models.train import learner_builders

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with Timer() as total:
        built = run_builders(BuildContext(store, config, progress=progress), learner_builders(config))
        learners = list(config.models.learners)
        frame = meta_frame(store, learners, config.stacking.raw_features)
        inputs = stack_inputs(frame, learners, config.stacking.raw_features)
        key = stack_key(store, config)
        with Timer() as timer:
            result = run_levels(inputs, config, trials, journal_storage(store), key, progress)
    record = {**result.record, "study_key": key, "stack_seconds": round(timer.seconds, 2),
              "total_seconds": round(total.seconds, 2),
              "base_learners": {b.table: {"status": b.status, "seconds": round(b.seconds, 2),
                                          "fold_smape": store.info(b.table).extra.get("fold_smape")}  # type: ignore[union-attr]
                                for b in built}}
    meta_path = store.root / "models" / "stack" / f"{key}.json"
    save_meta(meta_path, result, inputs)
    record["meta_model"] = str(meta_path.relative_to(store.root))
    train_rows, test_rows = inputs.fold >= 0, inputs.fold < 0
    fingerprint = f"{key}-t{trials}"
    stack_oof = pl.DataFrame({"sample_id": inputs.ids[train_rows], "fold": inputs.fold[train_rows],
                              "pred_log": result.meta_oof[train_rows],
                              "pred_price": np.expm1(result.meta_oof[train_rows])})
    store.write("stack_oof", stack_oof, builder="Stacker", params={"trials": trials, "key": key},
                fingerprint=fingerprint, seconds=timer.seconds, extra={"stack_cv_smape": record["stack_cv_smape"]})
    price = np.clip(np.expm1(result.test_pred), 0.01, None)
    predictions = pl.DataFrame({"sample_id": inputs.ids[test_rows], "price": price})
    store.write("predictions", predictions, builder="Stacker", params={"trials": trials, "key": key},
                fingerprint=fingerprint, seconds=timer.seconds, extra=record)
    if predictions.height:
        submission_path = store.root / config.stacking.submission
        write_submission(submission_path, inputs.ids[test_rows], price, inputs.ids[test_rows])
        record["submission"] = str(submission_path)
    runs = store.root / "runs"
    runs.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    run_path = runs / f"stack-{stamp}-{os.getpid()}.json"
    atomic_write(run_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    record["run_record"] = str(run_path)
    return record
