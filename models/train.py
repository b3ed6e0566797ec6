"""Cross-fitting: each base learner writes `oof__<learner>` (train rows: out-of-fold prediction; test rows: the
mean of the fold models) and its fold models in native formats under `<store>/models/<learner>/<fingerprint>/`.

What is guaranteed: the model that predicts fold k is fitted on the other folds' rows only, and its early
stopping watches a slice of those rows (drawn per fold, whole groups at a time), never fold k; so fold k's own
targets cannot move fold k's predictions given the feature tables (`tests/test_models.py` permutes them).
What is not: the feature tables themselves (target encodings, kNN prices) of the *other* folds' rows are
computed with fold k's labels visible, so fold k's labels reach fold k's model second-hand through those rows'
features. Measured at about 0.2 SMAPE on the Amazon sample, within fold-to-fold noise.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm import tqdm

from featurestore.budget import Budget
from featurestore.builders import BuildContext, Built, FeatureBuilder
from featurestore.config import Config
from featurestore.devices import threads
from featurestore.engine import Engine, LocalEngine
from featurestore.errors import ConfigError, InputError, MissingTable, StaleTable
from featurestore.folds import FoldMean, fold_plan
from featurestore.names import oof_table
from featurestore.sparse import sparse_column_names, sparse_width
from featurestore.store import FeatureStore, Timer, atomic_write, file_sha256, verify_file
from models.base import AUTO, BaseLearner, Inputs, WithObjective
from models.matrix import (
    MatrixSpec,
    cap_sparse_columns,
    feature_inputs,
    fit_spec,
    item_texts,
    load_frame,
    split_tables,
)
from models.metrics import METRICS, Metric, metric, to_price, to_target
from models.registry import learner_class, learner_settings, learner_tables, load_plugins

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"


def watch_mask(groups: np.ndarray, fraction: float, seed: int, fold: int) -> np.ndarray:
    """Rows whose group hashes below `fraction`: fold `fold`'s early-stopping slice. Drawn per fold, so no row is
    held out of every fold model; by group (seller), so the slice does not share near-duplicates with the rows
    the model trains on; by hash, so it does not depend on row order."""
    hashed = np.array([int.from_bytes(hashlib.blake2b(f"{seed}:{fold}:{g}".encode(), digest_size=8).digest(), "big")
                       for g in groups.tolist()], dtype=np.float64) / 2.0**64
    mask = hashed < fraction
    if not mask.any() and len(groups):
        mask[hashed == hashed.min()] = True
    if mask.all() and len(groups) > 1:  # one group only: fall back to a slice of its rows
        mask = np.zeros(len(groups), dtype=bool)
        mask[: max(1, int(len(groups) * fraction))] = True
    return mask


@dataclass
class CrossFitResult:
    oof: np.ndarray  # model output (target space) for every row; NaN on test rows
    test: np.ndarray  # mean of the fold models' outputs on the test rows
    fold_scores: dict[int, float] = field(default_factory=dict)  # the task's metric, per validation fold
    best_iterations: dict[int, int | None] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    importance: dict[str, float] = field(default_factory=dict)


@dataclass
class _Folds:
    """What every fold's fit reads (shipped to the engine once per learner)."""

    make: LearnerFactory
    x: Inputs
    y: np.ndarray
    groups: np.ndarray
    watch_fraction: float
    seed: int
    test_rows: np.ndarray


@dataclass
class _FoldFit:
    """What a fold's unit returns: the model files' bytes (the main process writes them) and what the reloaded
    model predicted."""

    files: dict[str, bytes]
    oof: np.ndarray
    test: np.ndarray
    importance: dict[str, float]
    best_iteration: int | None
    seconds: float


def _fit_fold(s: _Folds, unit: tuple[int, np.ndarray, np.ndarray, dict[str, bytes] | None], threads: int
              ) -> _FoldFit:
    """One (learner, fold): fit on the other folds (or load a fold saved by an interrupted run), save, reload the
    saved file and predict with it: the numbers come from exactly what `predict` will load. The train stage's
    unit; it writes only into its own temporary folder, never the store."""
    k, valid_rows, fit_rows, saved = unit
    with Timer() as timer, tempfile.TemporaryDirectory(prefix="fold-") as tmp:
        learner = s.make(k, threads)
        path = Path(tmp) / learner.file_pattern.format(fold=k)
        if saved is not None:
            for name, data in saved.items():
                (Path(tmp) / name).write_bytes(data)
            learner = s.make(k, threads).load(path)
        elif learner.uses_early_stopping:
            watch = watch_mask(s.groups[fit_rows], s.watch_fraction, s.seed, k)
            train_rows, watch_rows = fit_rows[~watch], fit_rows[watch]
            learner.fit(s.x.rows(train_rows), s.y[train_rows], s.x.rows(watch_rows), s.y[watch_rows])
        else:
            learner.fit(s.x.rows(fit_rows), s.y[fit_rows])
        if saved is None:
            learner.save(path)
        loaded = s.make(k, threads).load(path)
        oof = _finite(loaded.predict(s.x.rows(valid_rows)), loaded.name, k, "validation")
        test = (_finite(loaded.predict(s.x.rows(s.test_rows)), loaded.name, k, "test") if len(s.test_rows)
                else np.zeros(0))
        files = {f.name: f.read_bytes() for f in sorted(Path(tmp).iterdir()) if f.is_file()}
        importance, best = learner.importance(), learner.best_iteration
    return _FoldFit(files, oof, test, importance, best, round(timer.seconds, 2))


def cross_fit(
    make: LearnerFactory, x: Inputs, price: np.ndarray, fold: np.ndarray, groups: np.ndarray,
    target: str, watch_fraction: float, seed: int, model_dir: Path, progress: bool = False,
    task_metric: Metric = METRICS["smape"], engine: Engine | None = None, budget: Budget | None = None,
) -> CrossFitResult:
    """Fit one model per fold (seed + fold), save it, reload it and predict with the reloaded file, so the
    pipeline's numbers come from exactly what `predict` will load. `groups` keys the early-stopping slice.
    Folds are scored with `task_metric`; its row weights (MAPE: 1/y) reach learners that support weights.
    One unit per fold on `engine` (default: here, `make`'s threads); the main process writes each fold's model
    files as they arrive and combines predictions in fold order. `budget`: after each fold, OverBudget when the
    other folds at the same pace would end past its deadline (learners that resume folds pick up the ones written
    so far on a later run)."""
    engine = engine or LocalEngine(make.threads)
    is_test = fold < 0
    y = np.where(is_test, np.nan, to_target(np.nan_to_num(price, nan=1.0), target))
    weights = task_metric.fit_weights(np.nan_to_num(price, nan=1.0))
    if weights is not None and make.cls.supports_weights:
        x = replace(x, weight=np.where(is_test, 0.0, weights))
    plan = list(fold_plan(fold))
    oof = np.full(len(fold), np.nan)
    test_rows = np.flatnonzero(is_test)
    test_mean = FoldMean(len(test_rows))
    result = CrossFitResult(oof=oof, test=np.zeros(len(test_rows)))
    importance: dict[str, float] = {}
    units = []
    for k, valid_rows, fit_rows in plan:
        path = model_dir / make.cls.file_pattern.format(fold=k)
        # A fold saved (atomically) by an interrupted run of this same build: same inputs, same code.
        saved = {path.name: path.read_bytes()} if make.cls.resumes_folds and path.is_file() else None
        if saved is not None:
            log.info("fold %d: resumed from %s", k, path.name)
        units.append((k, valid_rows, fit_rows, saved))
    shared = _Folds(make, x, y, groups, watch_fraction, seed, test_rows)
    fits = engine.map("train", _fit_fold, units, shared)
    started = time.monotonic()
    arrivals = tqdm(zip(plan, units, fits, strict=True), total=len(plan), desc="folds", disable=not progress)
    for done, ((k, valid_rows, _), unit, fitted) in enumerate(arrivals, start=1):
        for name, data in fitted.files.items() if unit[3] is None else ():  # a resumed fold's files stay as they are
            atomic_write(model_dir / name, lambda tmp, data=data: tmp.write_bytes(data))
        if budget is not None and unit[3] is None:  # resumed folds cost nothing: the pace is the trained ones'
            trained = sum(u[3] is None for u in units[:done])
            budget.check_projection(make.name, trained, sum(u[3] is None for u in units), time.monotonic() - started)
        for name, gain in fitted.importance.items():
            importance[name] = importance.get(name, 0.0) + gain / len(plan)
        oof[valid_rows] = fitted.oof
        if len(test_rows):
            test_mean.add(fitted.test)
        result.fold_scores[k] = round(task_metric.score(price[valid_rows], to_price(oof[valid_rows], target)), 4)
        result.best_iterations[k] = fitted.best_iteration
        result.seconds[k] = fitted.seconds
    result.test = test_mean.mean()
    result.importance = importance
    return result


def _finite(pred: np.ndarray, learner: str, fold: int, rows: str) -> np.ndarray:
    """Non-finite predictions are an error where they appear, never a table (nor a "perfect" score)."""
    bad = int(np.count_nonzero(~np.isfinite(pred)))
    if bad:
        raise InputError(f"{learner}, fold {fold}: {bad} of {len(pred)} {rows} predictions are NaN or infinite; "
                         f"check models.{learner} settings (learning rate, loss) and the feature tables")
    return pred


def model_dir_for(store: FeatureStore, learner: str, fingerprint: str) -> Path:
    return store.models_dir(learner) / fingerprint


def task_target(config: Config) -> str:
    """The transform learners fit: task.target, or under "auto" the one the metric calls for."""
    return metric(config.task.metric).target if config.task.target == AUTO else config.task.target


def resolved_settings(config: Config, name: str) -> Any:
    """The learner's settings with objective = "auto" replaced by the loss the task's metric calls for."""
    settings = learner_settings(config, name)
    if isinstance(settings, WithObjective) and settings.objective == AUTO:
        settings = replace(settings, objective=metric(config.task.metric).objective)
    return settings


@dataclass
class LearnerFactory:
    """Fold k's learner: its own settings section (objective resolved), seed + k; threads from the engine that
    runs the fold (default: the configured `models.threads`). Picklable: it travels to Ray workers."""

    cls: type[BaseLearner]
    settings: Any
    seed: int
    threads: int
    feature_names: list[str]
    categorical: list[int]
    name: str

    def __call__(self, k: int, threads: int | None = None) -> BaseLearner:
        return self.cls(self.settings, self.seed + k, threads or self.threads, self.feature_names, self.categorical,
                        name=self.name)


def make_learner(config: Config, name: str, spec: MatrixSpec) -> LearnerFactory:
    return LearnerFactory(learner_class(name, config), resolved_settings(config, name), config.models.seed,
                          threads(config), spec.feature_names, spec.categorical_indices, name)


@dataclass
class TrainedLearner:
    """A trained learner's manifest record (the extras of `oof__<name>`), typed: the one shape `predict`, the
    stack and the report read."""

    model_dir: str  # the fold models + matrix spec, relative to the store
    folds: list[int]
    metric: str  # what fold_scores and oof_score measure (task.metric)
    fold_scores: dict[str, float]
    oof_score: float
    best_iterations: dict[str, int | None]
    fold_seconds: dict[str, float]
    objective: str
    target: str  # the transform it fit
    sample_weight: str  # the metric's row weights, "none", or "unsupported (unweighted)"
    library_params: dict[str, Any]
    n_features: int
    n_sparse_features: int
    dropped_columns: list[str]
    importance_top: dict[str, float]
    model_sha256: dict[str, str]  # every file of model_dir (fold models, spec), checked before loading

    def verify(self, store: FeatureStore, fix: str) -> None:
        """Every model file still has the bytes it was written with (IntegrityError otherwise)."""
        for name, digest in sorted(self.model_sha256.items()):
            verify_file(store.root / self.model_dir / name, digest, fix)

    @classmethod
    def of(cls, store: FeatureStore, learner: str) -> TrainedLearner:
        info = store.info(oof_table(learner))
        if info is None:
            raise MissingTable(f"no trained '{learner}' in {store.root}; run `python cli.py train` first")
        missing = [f.name for f in fields(cls) if f.name not in info.extra]
        if missing:
            raise StaleTable(f"{oof_table(learner)} in {store.root} was trained by an older version (its record lacks "
                             f"{', '.join(missing)}); retrain it: `python cli.py train --learner {learner} --force`")
        return cls(**{f.name: info.extra[f.name] for f in fields(cls)})


class LearnerBuilder(FeatureBuilder):
    """Writes `oof__<learner>`; reused (not retrained) while its tables, settings and code are unchanged."""

    version = "2"
    extra_versions = ("lightgbm", "xgboost", "catboost", "torch", "scikit-learn")
    reads = ("task", "models.seed", "models.max_categories", "models.early_stopping_fraction", "models.threads",
             "models.sections", "models.plugins")
    # Of all the learners' sections only this learner's resolved settings are hashed (below): another learner's
    # settings must not retrain this one. Threads change speed (the reproducibility promise is per thread count).
    not_fingerprinted = ("models.sections", "models.plugins", "models.threads")

    def __init__(self, config: Config, name: str) -> None:
        super().__init__(config)
        self.name = name
        self.cls = learner_class(name, config)
        self.settings = learner_settings(config, name)
        self.tables = learner_tables(config, name)
        self.table = oof_table(name)
        self.inputs = ("items", "folds", *self.tables)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "learner": self.name, "target": task_target(self.config)}

    def code_sources(self) -> tuple[object, ...]:
        import models.base
        import models.matrix
        import models.metrics

        return (type(self), self.cls, models.base, models.matrix, models.metrics)

    def artifacts_ok(self, store: FeatureStore, fingerprint: str) -> bool:
        """The model folder is complete and undamaged: a model file with other bytes than recorded retrains."""
        if not (model_dir_for(store, self.name, fingerprint) / SPEC_FILE).is_file():
            return False
        info = store.info(self.table)
        hashes = info.extra.get("model_sha256") if info is not None else None
        if not hashes:
            return False
        model_dir = store.root / info.extra["model_dir"]  # type: ignore[union-attr]
        damaged = [n for n, digest in hashes.items() if not (model_dir / n).is_file()
                   or file_sha256(model_dir / n) != digest]
        if damaged:
            log.warning("%s: model file(s) %s are damaged or missing; retraining", self.table, damaged)
        return not damaged

    def _remove_stale_models(self, store: FeatureStore, keep: Path) -> None:
        """Folders of neither this build nor the committed `oof__` row: a crash mid-retrain must leave the
        models that the committed tables (and `predict`) point at, so those are deleted only a build later."""
        info = store.info(self.table)
        # Only the folder is read here, not the whole record: a store made by an older version (whose record
        # lacks newer fields) must still retrain.
        committed = store.root / info.extra["model_dir"] if info is not None and "model_dir" in info.extra else None
        for old in keep.parent.glob("*"):
            if old not in (keep, committed):
                shutil.rmtree(old, ignore_errors=True)

    def build(self, ctx: BuildContext) -> Built:
        m = self.config.models
        model_dir = model_dir_for(ctx.store, self.name, ctx.fingerprint)
        self._remove_stale_models(ctx.store, model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        if not self.tables and not self.cls.reads_text:
            raise ConfigError(f"learner {self.name} has no feature tables; list some in models.{self.name}.tables")
        _, sparse_tables = split_tables(ctx.store, self.tables)
        if sparse_tables and not self.cls.reads_sparse:
            raise ConfigError(f"learner {self.name} does not read sparse tables; take {sparse_tables} out of "
                             f"models.{self.name}.tables")
        frame = load_frame(ctx.store, self.tables)
        train = frame.filter(pl.col("split") == "train")
        spec = fit_spec(train, self.tables, m.max_categories, {t: sparse_width(ctx.store, t) for t in sparse_tables})
        cap_sparse_columns(spec, ctx.store, train["sample_id"].to_numpy(),
                           self.cls.sparse_column_cap(self.settings))
        x = feature_inputs(ctx.store, spec, frame)
        if self.cls.reads_text:
            x = replace(x, text=item_texts(ctx.store, frame))
        fold = frame["fold"].to_numpy()
        price = frame["price"].cast(pl.Float64).fill_null(np.nan).to_numpy()
        groups = frame.select(pl.coalesce("group_id", pl.col("sample_id").cast(pl.String)))["group_id"].to_numpy()
        make = make_learner(self.config, self.name, spec)
        task_metric, target = metric(self.config.task.metric), task_target(self.config)
        result = cross_fit(make, x, price, fold, groups, target, m.early_stopping_fraction, m.seed, model_dir,
                           progress=ctx.progress, task_metric=task_metric, engine=ctx.engine, budget=ctx.budget)
        spec.save(model_dir / SPEC_FILE)  # last: its presence marks a complete model folder
        output = np.where(fold >= 0, result.oof, np.nan)
        output[fold < 0] = result.test
        price_pred = to_price(output, target)
        train_rows = fold >= 0
        top = sorted(result.importance.items(), key=lambda kv: -kv[1])[:30]
        record = TrainedLearner(
            model_dir=str(model_dir.relative_to(ctx.store.root)),
            metric=task_metric.name,
            folds=sorted(result.fold_scores),
            fold_scores=result.fold_scores,
            oof_score=round(task_metric.score(price[train_rows], price_pred[train_rows]), 4),
            best_iterations=result.best_iterations,
            fold_seconds=result.seconds,
            objective=self.cls.fitted_objective(resolved_settings(self.config, self.name)),
            target=target,
            sample_weight=(task_metric.weights_rule if self.cls.supports_weights or task_metric.weights is None
                           else "unsupported (unweighted)"),
            library_params=make(0).recorded_params(),
            n_features=len(spec.feature_names),
            n_sparse_features=sum(spec.sparse.values()),
            dropped_columns=spec.dropped,
            importance_top=dict(_readable(ctx.store, top, spec)),
            model_sha256={p.name: file_sha256(p) for p in sorted(model_dir.iterdir()) if p.is_file()},
        )
        log.info("%s: OOF %s %.2f (folds %s)", self.table, task_metric.name, record.oof_score, result.fold_scores)
        table = frame.select("sample_id", "fold").with_columns(
            pl.Series("pred", output), pl.Series("pred_log", np.log1p(price_pred)), pl.Series("pred_price", price_pred))
        return Built(table, {**asdict(record), "engine": ctx.engine.record("train")})


def _readable(store: FeatureStore, top: list[tuple[str, float]], spec: MatrixSpec) -> list[tuple[str, float]]:
    """Sparse feature names "text_sparse[123]" -> "text_sparse:name:word=leather" for the manifest."""
    terms = {table: sparse_column_names(store, table) for table in spec.sparse}
    out = []
    for name, gain in top:
        table, _, rest = name.partition("[")
        if table in terms:
            name = f"{table}:{terms[table][int(rest[:-1])]}"
        out.append((name, round(gain, 4)))
    return out


def learner_builders(config: Config, names: list[str] | None = None) -> list[LearnerBuilder]:
    load_plugins(config)
    return [LearnerBuilder(config, name) for name in (names or config.models.learners)]

