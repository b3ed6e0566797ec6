"""The stack: Optuna proposes meta-learner candidates (which meta, its hyper-parameters) over the base learners'
OOF predictions; a second level of cross-validation on the same folds scores them.

Honesty. Level 1: a row's OOF prediction comes from the fold model that never saw it. Level 2 (nested, the
default): the meta-learner that predicts outer fold k is *chosen* and fitted without fold k's rows, so the
reported stack SMAPE is measured on rows its tuning never saw (many trials over OOF predictions otherwise
overfit). The final meta-learner is chosen by CV on all training rows, refitted on them, and predicts the test rows.

Speed (issue 11: 2,371 s -> seconds). One candidate set serves every outer fold: candidates are drawn
independently of the data (Optuna's RandomSampler, reseeded per candidate index, so a resumed run proposes the same
ones), so no candidate carries information from the fold it is scored on. Each candidate is fitted 15 times for
5 folds: once without each fold {a} (the final CV, and the nested OOF predictions) and once without each pair
{a, b} (that one model is outer fold a's inner model for fold b and outer fold b's for fold a). Ridge is solved in
closed form; the LightGBM meta reads its round count off the held-out curves of those same fits. Candidates are
evaluated in parallel processes, one thread each. The mean of the base predictions and the best single learner are
always candidates, so the stack can fall back to them when a fitted meta overfits.

Studies live in `<store>/optuna.journal` (Optuna's journal file storage), named by a key of their inputs; each
candidate's scores are stored with its trial, so a rerun after a crash evaluates only the missing candidates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import resource
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from itertools import combinations
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import polars as pl
from threadpoolctl import threadpool_limits

from featurestore.builders import BuildResult
from featurestore.config import Config, ConfigError
from featurestore.errors import UserError
from featurestore.fingerprint import code_hash
from featurestore.folds import n_folds
from featurestore.names import (
    FOLDS,
    ITEMS,
    PREDICTIONS,
    STACK_OOF,
    feature_table_problem,
    label_column_problem,
    learner_of,
    oof_table,
)
from featurestore.store import FeatureStore, Timer, atomic_write, file_sha256, quote_ident, verify_file
from models.base import threads
from models.matrix import left_join, query_items
from models.metrics import metric
from models.train import TrainedLearner
from stacking.meta import BASELINE_METAS, CANDIDATE_WEIGHTS, MetaLearner, meta_class

log = logging.getLogger(__name__)

# Meta fits run single-threaded everywhere (workers and the final refit), so a refit reproduces the evaluated
# model bit for bit and parallel candidates do not fight over cores.
META_THREADS = 1


@dataclass
class StackInputs:
    ids: np.ndarray
    fold: np.ndarray  # -1 on test rows
    price: np.ndarray  # NaN on test rows
    x: np.ndarray  # base predictions (log1p price) first, then raw features
    feature_names: list[str]
    n_base: int
    metric: str = "smape"  # the task's metric: candidates are scored and chosen by it

    @functools.cached_property
    def weight(self) -> np.ndarray | None:
        """Row weights the metas fit with (MAPE: 1/y); NaN on test rows (never fitted)."""
        train = ~np.isnan(self.price)
        weights = metric(self.metric).fit_weights(self.price[train])
        if weights is None:
            return None
        out = np.full(len(self.price), np.nan)
        out[train] = weights
        return out

    @functools.cached_property
    def y(self) -> np.ndarray:
        """log1p(price), computed once: every one of a study's thousands of fits reads it."""
        return np.log1p(self.price)


def meta_frame(store: FeatureStore, learners: list[str], raw_features: list[str]) -> pl.DataFrame:
    """items + folds + each learner's pred_log + raw features, joined by DuckDB, ordered by sample_id."""
    select: list[str] = []
    joins = []
    for n, learner in enumerate(learners):
        table = oof_table(learner)
        if not store.has_table(table):
            raise FileNotFoundError(f"table {table} is missing; `python cli.py stack` trains it")
        select.append(f"o{n}.pred_log AS {quote_ident(learner)}")
        joins.append(left_join(table, f"o{n}"))
    raw_tables: dict[str, str] = {}
    for feature in raw_features:
        table, _, column = feature.partition(".")
        if not column:
            raise ValueError(f"stacking.raw_features: {feature!r}; expected 'table.column'")
        problem = feature_table_problem(table) or label_column_problem(column)
        if problem:  # the config refuses these at load; a config built in code meets them here
            raise ConfigError(f"stacking.raw_features: {problem}")
        if not store.has_table(table):
            raise FileNotFoundError(f"stacking.raw_features names {feature!r}, but table {table} is not built")
        if column not in pl.read_parquet_schema(store.table_path(table)):
            raise ValueError(f"stacking.raw_features names {feature!r}, but {table} has no column {column!r}")
        if table not in raw_tables:
            raw_tables[table] = f"r{len(raw_tables)}"
            joins.append(left_join(table, raw_tables[table]))
        select.append(f"{raw_tables[table]}.{quote_ident(column)}::DOUBLE AS {quote_ident(feature)}")
    store.verify_tables([ITEMS, FOLDS, *(oof_table(n) for n in learners), *raw_tables])
    return query_items(store, select, joins)


def stack_inputs(frame: pl.DataFrame, learners: list[str], raw_features: list[str], task_metric: str = "smape"
                 ) -> StackInputs:
    names = [*learners, *raw_features]
    return StackInputs(
        ids=frame["sample_id"].to_numpy(), fold=frame["fold"].to_numpy(),
        price=frame["price"].cast(pl.Float64).fill_null(np.nan).to_numpy(),
        x=frame.select(pl.col(names).cast(pl.Float64)).to_numpy(), feature_names=names, n_base=len(learners),
        metric=task_metric)


def make_meta(name: str, params: dict[str, Any], n_base: int, seed: int, task_metric: str = "smape"
              ) -> MetaLearner:
    return meta_class(name)(params, n_base, seed, META_THREADS, task_metric)


# -- evaluating one candidate -------------------------------------------------------------------------------
@dataclass
class Candidate:
    index: int
    meta: str
    params: dict[str, Any]


@dataclass
class Scores:
    inner: dict[int, float]  # outer fold k -> the task's metric on its inner CV (rows outside fold k)
    final: float  # the task's metric on the CV over all training rows
    at: dict[str, int | None]  # curve parameter (LightGBM rounds) per outer fold ("k") and for "final"


def _fit(c: Candidate, inputs: StackInputs, rows: np.ndarray, seed: int, valid: list[np.ndarray] | None,
         at: int | None = None) -> MetaLearner:
    params = dict(c.params)
    if at is not None and meta_class(c.meta).curve_param:
        params[meta_class(c.meta).curve_param] = at
    return make_meta(c.meta, params, inputs.n_base, seed, inputs.metric).fit_rows(inputs.x, inputs.y, rows, valid,
                                                                                  inputs.weight)


def _best_round(curves: list[np.ndarray], weights: list[int]) -> int:
    """Best round of the row-weighted mean curve over the rounds every fit reached (fits stop early)."""
    length = min(len(c) for c in curves)
    mean = sum(w * c[:length] for w, c in zip(weights, curves, strict=True)) / sum(weights)
    return int(np.argmin(mean)) + 1


def evaluate(c: Candidate, inputs: StackInputs, seed: int) -> Scores:
    """Fit without each fold and without each pair of folds; score every outer fold's inner CV and the final CV."""
    train = np.flatnonzero(inputs.fold >= 0)
    folds = sorted(set(inputs.fold[train].tolist()))
    rows_of = {k: train[inputs.fold[train] == k] for k in folds}
    curved = meta_class(c.meta).curve_param is not None
    score = metric(inputs.metric).score
    singles = {a: _fit(c, inputs, train[inputs.fold[train] != a], seed, [rows_of[a]] if curved else None)
               for a in folds}
    pairs = {}
    for a, b in combinations(folds, 2):
        fit_rows = train[(inputs.fold[train] != a) & (inputs.fold[train] != b)]
        pairs[(a, b)] = pairs[(b, a)] = _fit(c, inputs, fit_rows, seed, [rows_of[a], rows_of[b]] if curved else None)
    at: dict[str, int | None] = {}
    inner: dict[int, float] = {}
    for k in folds:
        others = [j for j in folds if j != k]
        if curved:  # pair (k, j) recorded fold j's curve as valid set 0 or 1 depending on the order of (a, b)
            curves = [pairs[(k, j)].curves_[1 if k < j else 0] for j in others]
            at[str(k)] = _best_round(curves, [len(rows_of[j]) for j in others])
        pred = np.concatenate([pairs[(k, j)].predict(inputs.x[rows_of[j]], at.get(str(k))) for j in others])
        truth = np.concatenate([inputs.price[rows_of[j]] for j in others])
        inner[k] = score(truth, np.expm1(pred))
    if curved:
        at["final"] = _best_round([singles[a].curves_[0] for a in folds], [len(rows_of[a]) for a in folds])
    pred = np.concatenate([singles[a].predict(inputs.x[rows_of[a]], at.get("final")) for a in folds])
    truth = np.concatenate([inputs.price[rows_of[a]] for a in folds])
    return Scores(inner, score(truth, np.expm1(pred)), at)


_WORKER: dict[str, Any] = {}


def _init_worker(inputs: StackInputs, seed: int) -> None:
    # One thread per worker for the BLAS/OpenMP pools too (numpy's OpenBLAS starts one thread per core in each
    # spawned worker): with `workers` processes on as many cores, any more only thrash. Measured on Mercari,
    # 30 candidates: 2 workers took 33.4 s without this limit, as long as 1 worker (31.7 s).
    _WORKER.update(inputs=inputs, seed=seed, limits=threadpool_limits(limits=META_THREADS))


def _evaluate_in_worker(candidate: Candidate) -> Scores:
    return evaluate(candidate, _WORKER["inputs"], _WORKER["seed"])


# -- the study ------------------------------------------------------------------------------------------------
def _propose(study: optuna.Study, index: int, metas: list[str], seed: int) -> tuple[optuna.Trial, Candidate]:
    """Candidate `index`: the baselines first, then random draws seeded by (seed, index): the same candidates
    whatever the run's history, so an interrupted run resumes to identical results."""
    study.sampler = optuna.samplers.RandomSampler(seed=seed * 1_000_003 + index)
    trial = study.ask()
    trial.set_user_attr("candidate", index)
    if index < len(BASELINE_METAS):
        meta = BASELINE_METAS[index]
        trial.set_user_attr("meta", meta)
        return trial, Candidate(index, meta, {})
    meta = _meta_for(index - len(BASELINE_METAS), metas)
    trial.set_user_attr("meta", meta)
    return trial, Candidate(index, meta, meta_class(meta).suggest(trial))


def _meta_for(draw: int, metas: list[str]) -> str:
    """Which meta the draw-th random candidate is: a fixed cycle weighted by CANDIDATE_WEIGHTS, so the mix does
    not depend on the data and a resumed run assigns the same metas."""
    weights = {m: CANDIDATE_WEIGHTS.get(m, 1) for m in metas}
    # Interleaved (blend, ridge, lgbm, blend, ridge, ...): a short study still sees every meta.
    cycle = [m for r in range(max(weights.values())) for m in metas if weights[m] > r]
    return cycle[draw % len(cycle)]


def _params_of(trial: optuna.trial.FrozenTrial) -> Candidate:
    meta = trial.user_attrs["meta"]
    prefix = f"{meta}_"
    params = {k[len(prefix):]: v for k, v in trial.params.items() if k.startswith(prefix)}
    return Candidate(int(trial.user_attrs["candidate"]), meta, params)


def run_study(study_name: str, inputs: StackInputs, config: Config, trials: int,
              storage: optuna.storages.BaseStorage | None, workers: int = 1) -> dict[int, tuple[Candidate, Scores]]:
    """Evaluate `trials` candidates (the baselines included); resume the ones a previous run finished."""
    metas = [m for m in config.stacking.metas if m not in BASELINE_METAS]
    for name in config.stacking.metas:
        meta_class(name)
    if n_folds(inputs.fold) < 3:
        raise ValueError(f"stacking needs at least 3 folds for its nested CV; folds.k gives {n_folds(inputs.fold)}")
    seed = config.stacking.seed
    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(seed=seed), load_if_exists=True)
    done: dict[int, tuple[Candidate, Scores]] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.COMPLETE and "scores" in trial.user_attrs:
            if trial.user_attrs.get("checksum") != _checksum(trial.user_attrs, trial.params):
                # A damaged record (a flipped digit in a score would pick another meta-learner): evaluate the
                # candidate again instead of trusting it.
                log.warning("optuna journal: candidate %s's record fails its checksum; evaluating it again",
                            trial.user_attrs.get("candidate"))
                continue
            raw = trial.user_attrs["scores"]
            scores = Scores({int(k): v for k, v in raw["inner"].items()}, raw["final"], raw["at"])
            done[int(trial.user_attrs["candidate"])] = (_params_of(trial), scores)
        elif trial.state == optuna.trial.TrialState.RUNNING:  # left by a crashed run: its candidate is redone
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    todo = [i for i in range(max(trials, len(BASELINE_METAS))) if i not in done]
    if not metas:
        todo = [i for i in todo if i < len(BASELINE_METAS)]
    proposed = [_propose(study, i, metas, seed) for i in todo]
    candidates = [c for _, c in proposed]
    # Scores are told as they arrive (in candidate order), so a crash keeps every candidate finished before it.
    if workers > 1 and len(candidates) > 1:
        # Spawned, not forked: `stack` has just trained the learners in this process, and OpenMP (LightGBM,
        # torch) deadlocks in a child forked from a parent whose thread pool is running.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(inputs, seed)) as pool:
            _tell_all(study, proposed, pool.map(_evaluate_in_worker, candidates, chunksize=2), done)
    else:
        _tell_all(study, proposed, (evaluate(c, inputs, seed) for c in candidates), done)
    return done


def _tell_all(study: optuna.Study, proposed: list[tuple[optuna.Trial, Candidate]], results: Iterator[Scores],
              done: dict[int, tuple[Candidate, Scores]]) -> None:
    for (trial, candidate), scores in zip(proposed, results, strict=True):
        record = {"inner": {str(k): v for k, v in scores.inner.items()}, "final": scores.final, "at": scores.at}
        trial.set_user_attr("scores", record)
        trial.set_user_attr("checksum", _checksum({"scores": record, "candidate": candidate.index,
                                                   "meta": candidate.meta}, trial.params))
        study.tell(trial, scores.final)
        done[candidate.index] = (candidate, scores)


def _checksum(attrs: dict[str, Any], params: dict[str, Any]) -> str:
    """sha256 over what a finished candidate's record is trusted for: its scores, index, meta and parameters."""
    payload = {"scores": attrs.get("scores"), "candidate": attrs.get("candidate"), "meta": attrs.get("meta"),
               "params": params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _choose(done: dict[int, tuple[Candidate, Scores]], key: Any) -> tuple[Candidate, Scores]:
    """Lowest score (ties: lowest candidate index); key = an outer fold k, or "final"."""
    def score(item: tuple[int, tuple[Candidate, Scores]]) -> tuple[float, int]:
        _, (_, s) = item
        return (s.final if key == "final" else s.inner[key], item[0])

    return min(done.items(), key=score)[1]


@dataclass
class StackResult:
    meta_oof: np.ndarray  # log1p-price meta-predictions of train rows (nested: chosen without their fold)
    test_pred: np.ndarray  # log1p-price predictions of test rows by the final meta-learner
    final_meta: MetaLearner
    final_name: str
    final_params: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)


def run_levels(inputs: StackInputs, config: Config, trials: int, storage: optuna.storages.BaseStorage | None,
               key: str, workers: int = 1) -> StackResult:
    """Nested level-2 CV (honest stack score) + the final meta-learner. Pure given its inputs: no store I/O."""
    seed = config.stacking.seed
    train_rows = np.flatnonzero(inputs.fold >= 0)
    test_rows = np.flatnonzero(inputs.fold < 0)
    folds = sorted(set(inputs.fold[train_rows].tolist()))
    done = run_study(f"{key}-candidates", inputs, config, trials, storage, workers)
    final, final_scores = _choose(done, "final")
    meta_oof = np.full(len(inputs.ids), np.nan)
    outer: dict[int, dict[str, Any]] = {}
    for k in folds:
        # Nested: fold k is predicted by the candidate its inner CV (rows outside fold k) chose; not nested
        # (optimistic, flagged in the record): by the candidate all rows chose.
        chosen, scores = _choose(done, k) if config.stacking.nested else (final, final_scores)
        at = scores.at.get(str(k) if config.stacking.nested else "final")
        held = train_rows[inputs.fold[train_rows] == k]
        meta = _fit(chosen, inputs, train_rows[inputs.fold[train_rows] != k], seed, None, at)
        meta_oof[held] = meta.predict(inputs.x[held])
        outer[k] = {"meta": chosen.meta, "params": chosen.params, "candidate": chosen.index,
                    "inner_cv": round(scores.inner[k], 4), "rounds": at}
    meta = _fit(final, inputs, train_rows, seed, None, final_scores.at.get("final"))
    test_pred = meta.predict(inputs.x[test_rows]) if len(test_rows) else np.zeros(0)
    price = inputs.price[train_rows]
    score = metric(inputs.metric).score
    base_cv = {n: round(score(price, np.expm1(inputs.x[train_rows, i])), 4)
               for i, n in enumerate(inputs.feature_names[: inputs.n_base])}
    mean_blend = np.expm1(inputs.x[train_rows, : inputs.n_base].mean(axis=1))
    final_params = dict(final.params)
    if final_scores.at.get("final") is not None:
        final_params[meta_class(final.meta).curve_param] = final_scores.at["final"]  # type: ignore[index]
    record = {
        "trials": trials, "candidates": len(done), "nested": config.stacking.nested,
        "metas": list(config.stacking.metas), "best_meta": final.meta, "best_params": final_params,
        "metric": inputs.metric, "final_cv": round(final_scores.final, 4),
        "stack_cv": round(score(price, np.expm1(meta_oof[train_rows])), 4),
        "base_cv": base_cv, "best_single_cv": min(base_cv.values()),
        "mean_blend_cv": round(score(price, mean_blend), 4),
        "outer_folds": outer, "meta_features": inputs.feature_names, "train_rows": len(train_rows),
        "test_rows": len(test_rows),
    }
    return StackResult(meta_oof, test_pred, meta, final.meta, final_params, record)


def _source_hash() -> str:
    import stacking.meta

    return code_hash((stacking.meta, sys.modules[__name__]))


def stack_key(store: FeatureStore, config: Config) -> str:
    payload = {"oof": {n: store.info(oof_table(n)).fingerprint for n in config.models.learners},  # type: ignore[union-attr]
               "raw": config.stacking.raw_features, "metas": config.stacking.metas, "seed": config.stacking.seed,
               "nested": config.stacking.nested,
        # The meta-learners' and the study's code: candidates scored by older code are never reused.
        "code": _source_hash()}
    return "stack-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _repair_journal(path: Path) -> None:
    """A kill mid-append leaves a torn last line, which Optuna refuses with a bare JSON error. That line is a
    record that never completed: cut it (its candidate is evaluated again). A bad line elsewhere is not ours to
    guess about: refuse, naming it."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: cutting a torn last record (%d bytes) left by an interrupted run", path, len(data) - keep)
        with path.open("r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            json.loads(line)
        except ValueError:
            raise UserError(f"{path}, line {number}: not a JSON record; the Optuna journal is damaged. Delete it "
                            "to restart the stack's study from scratch (base learners are kept)") from None


@dataclass
class TrainedStack:
    """What `predict` needs of a trained stack, typed (from the `predictions` manifest row's run record)."""

    study_key: str
    learners: list[str]
    raw_features: list[str]
    meta_model: str  # relative to the store
    meta_sha256: str  # of the meta-learner file, checked before it is loaded

    @classmethod
    def of(cls, store: FeatureStore) -> TrainedStack:
        info = store.info(PREDICTIONS)
        if info is None:
            raise FileNotFoundError(f"no stack in {store.root}; run `python cli.py stack` first")
        try:
            return cls(**{f.name: info.extra[f.name] for f in fields(cls)})
        except KeyError as exc:
            raise UserError(f"the stack in {store.root} was made by an older version (no {exc} in its record); "
                            "rerun `python cli.py stack`") from None

    def load_meta(self, store: FeatureStore, config: Config) -> tuple[MetaLearner, list[str]]:
        path = store.root / self.meta_model
        verify_file(path, self.meta_sha256, "rerun `python cli.py stack` to refit the meta-learner")
        return load_meta(path, config)


def journal_storage(store: FeatureStore) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend

    _repair_journal(store.journal_path)
    # Optuna's journal lock (a symlink) left by a killed `stack` made the next one wait its 30 s grace period.
    # Only the writer (this command, under the store's writer lock) uses the journal, so a lock found now is stale.
    stale_lock = Path(f"{store.journal_path}.lock")
    if os.path.lexists(stale_lock):
        log.info("removing %s left by a `stack` that did not finish", stale_lock)
        stale_lock.unlink()
    return optuna.storages.JournalStorage(JournalFileBackend(str(store.journal_path)))


def save_meta(path: Path, result: StackResult, inputs: StackInputs) -> None:
    payload = {"meta": result.final_name, "params": result.final_params, "n_base": inputs.n_base,
               "feature_names": inputs.feature_names, "state": result.final_meta.state()}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload)))


def load_meta(path: Path, config: Config) -> tuple[MetaLearner, list[str]]:
    payload = json.loads(path.read_text())
    meta = make_meta(payload["meta"], payload["params"], payload["n_base"], config.stacking.seed)
    meta.set_state(payload["state"])
    return meta, payload["feature_names"]


def check_submission(ids: np.ndarray, price: np.ndarray, expected_ids: np.ndarray) -> pl.DataFrame:
    submission = pl.DataFrame({"sample_id": ids, "price": price})
    if submission["sample_id"].n_unique() != submission.height or set(ids.tolist()) != set(expected_ids.tolist()):
        raise RuntimeError("submission ids do not match the test ids one to one")
    if not np.all(np.isfinite(price)) or np.any(price <= 0):
        raise ValueError("submission has non-finite or non-positive prices; nothing was written")
    return submission


def write_submission(path: Path, ids: np.ndarray, price: np.ndarray, expected_ids: np.ndarray) -> pl.DataFrame:
    """The challenge format (sample_id,price): every test id exactly once, finite positive prices; CSV, or
    Parquet when `path` ends in .parquet."""
    submission = check_submission(ids, price, expected_ids)
    if path.suffix == ".parquet":
        atomic_write(path, lambda tmp: submission.write_parquet(tmp))
    else:
        atomic_write(path, lambda tmp: submission.write_csv(tmp))
    return submission


def check_stack_settings(config: Config) -> None:
    """What would otherwise fail only after the base learners trained (minutes to hours): no learners, an
    unknown learner or meta-learner name."""
    from models.registry import learner_class, load_plugins

    load_plugins(config)
    if not config.models.learners:
        raise ConfigError("models.learners is empty; name at least one learner, e.g. learners = [\"lgbm\"]")
    for name in config.models.learners:
        learner_class(name)
    for name in config.stacking.metas:
        meta_class(name)


def run_stack(store: FeatureStore, config: Config, trials: int, built: list[BuildResult],
              train_seconds: float = 0.0) -> dict[str, Any]:
    """Run the studies over the trained learners' OOF tables (`built`: how each was trained, for the record);
    write stack_oof, predictions, submission.csv and a run record."""
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
                result = run_levels(inputs, config, trials, journal_storage(store), key, workers=threads(config))
    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    record = {**result.record, "study_key": key, "stack_seconds": round(timer.seconds, 2),
              "total_seconds": round(train_seconds + total.seconds, 2), "peak_rss_mib": round(peak_kib / 1024, 1),
              "workers": threads(config),
              "learners": learners, "raw_features": list(config.stacking.raw_features),
              "base_learners": {b.table: {"status": b.status, "seconds": round(b.seconds, 2),
                                          "fold_scores": TrainedLearner.of(store, learner_of(b.table)).fold_scores}
                                for b in built}}
    train_rows, test_rows = inputs.fold >= 0, inputs.fold < 0
    # Everything is checked before anything is committed: a NaN meta-prediction or a bad submission must not
    # leave stack_oof / predictions tables behind (they were written before the submission check failed).
    for what, values in (("nested out-of-fold", result.meta_oof[train_rows]), ("test", result.test_pred)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise ValueError(f"the stack's {result.final_name} meta-learner gave {bad} non-finite {what} "
                             "predictions; nothing was written (check the base learners' oof__ tables)")
    price = np.clip(np.expm1(result.test_pred), 0.01, None)
    check_submission(inputs.ids[test_rows], price, inputs.ids[test_rows])
    meta_path = store.models_dir("stack") / f"{key}.json"
    save_meta(meta_path, result, inputs)
    record["meta_model"] = str(meta_path.relative_to(store.root))
    record["meta_sha256"] = file_sha256(meta_path)
    fingerprint = f"{key}-t{trials}"
    stack_oof = pl.DataFrame({"sample_id": inputs.ids[train_rows], "fold": inputs.fold[train_rows],
                              "pred_log": result.meta_oof[train_rows],
                              "pred_price": np.expm1(result.meta_oof[train_rows])})
    store.write(STACK_OOF, stack_oof, builder="Stacker", params={"trials": trials, "key": key},
                fingerprint=fingerprint, seconds=timer.seconds,
                extra={"metric": record["metric"], "stack_cv": record["stack_cv"]})
    predictions = pl.DataFrame({"sample_id": inputs.ids[test_rows], "price": price})
    store.write(PREDICTIONS, predictions, builder="Stacker", params={"trials": trials, "key": key},
                fingerprint=fingerprint, seconds=timer.seconds, extra=record)
    if predictions.height:
        submission_path = store.root / config.stacking.submission
        write_submission(submission_path, inputs.ids[test_rows], price, inputs.ids[test_rows])
        record["submission"] = str(submission_path)
    runs = store.runs_dir
    runs.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    run_path = runs / f"stack-{stamp}-{os.getpid()}.json"
    atomic_write(run_path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))
    record["run_record"] = str(run_path)
    return record
