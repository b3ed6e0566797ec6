"""The Python API: one object opened on a config and a store, with the verbs the CLI has (the SQLMesh `Context`
pattern). `cli.py` is a thin shell over it: each command parses its flags, calls one method, prints the result.

    from pipeline.context import Context

    ctx = Context("configs/default.toml")          # or Context(config, overrides={"store.dir": "store_x"})
    ctx.build_features()                            # -> [BuildResult(table, status, rows, seconds)]
    record = ctx.stack(trials=20)                   # trains stale learners first; -> StackRecord
    ctx.sql("SELECT count(*) AS n FROM catalog")    # -> polars DataFrame (read-only, like `cli.py sql`)
    ctx.predict(new_rows)                           # polars DataFrame in the data columns -> sample_id, price
                                                    # (nothing written; what `predict` and `serve` give)

Errors are the CLI's typed errors (featurestore.errors: ConfigError, InputError, MissingTable, StaleTable, ...);
the CLI turns them into one red line. Commands that write hold the store's writer lock for their whole run, as
the CLI's do; reading commands never create a store.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from featurestore.budget import Budget
from featurestore.builders import BuildContext, BuildResult, run_builders
from featurestore.config import Config, edited, load_config
from featurestore.errors import UserError
from featurestore.lock import writer_lock
from featurestore.store import FeatureStore

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.online import Predictor
    from stacking.record import StackRecord

DEFAULT_CONFIG = Path("configs/default.toml")


def open_config(config: str | Path | Config | None = None, overrides: dict[str, Any] | None = None,
                learners: bool = True) -> Config:
    """The config, validated at load (a Config object is re-checked with the overrides applied). `learners`:
    register the checks of every `[models.<name>]`, `builders` and `[features.<name>]` entry too (imports the
    learner and builder modules, ~3 s, which `tables` and `sql` do not need)."""
    import pipeline.presets  # noqa: F401  registers the generic preset rules, laid over the file at load
    if learners:
        import models.registry  # noqa: F401  registers the check of every [models.<name>] section, run at load
        import pipeline.registry  # noqa: F401  and of `builders` and every [features.<name>] section
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if isinstance(config, Config):
        return edited(config, overrides)  # its preset was laid over it when it loaded
    if config is None and DEFAULT_CONFIG.is_file():
        config = DEFAULT_CONFIG
    return load_config(None if config is None else Path(config), overrides)


def _limit(seconds: float) -> float:
    if not seconds > 0:
        raise UserError(f"--time-limit is {seconds!r}; expected a number of seconds > 0")
    return float(seconds)


class Context:
    """A config and its store. `overrides`: dotted keys as the CLI's flags give them ({"store.dir": ...});
    None values are ignored. `progress`: progress bars and per-table logs."""

    def __init__(self, config: str | Path | Config | None = None, overrides: dict[str, Any] | None = None,
                 progress: bool = False, learners: bool = True) -> None:
        self.config = open_config(config, overrides, learners)
        self.progress = progress
        self._predictor: Predictor | None = None

    @property
    def root(self) -> Path:
        return Path(self.config.store.dir)

    def store(self) -> FeatureStore:
        """The store, opened for reading: a missing store is an error, never made."""
        return FeatureStore(self.root, create=False)

    @contextmanager
    def writing(self, command: str) -> Iterator[FeatureStore]:
        """The store (made when missing), holding its writer lock for the whole block. A loaded predictor is
        dropped: what it loaded may be rebuilt."""
        self._predictor = None
        with writer_lock(self.root.resolve(), command):
            yield FeatureStore(self.root)

    # -- the verbs ------------------------------------------------------------------------------------------
    def build_features(self, only: list[str] | None = None, force: bool = False) -> list[BuildResult]:
        """Ingest, then every table in `builders` (or `only` these), each skipped when up to date."""
        from pipeline.registry import builders_for

        with self.writing("build-features") as store:
            return run_builders(BuildContext(store=store, config=self.config, progress=self.progress),
                                builders_for(self.config, only), force=force)

    def ingest(self, force: bool = False) -> list[BuildResult]:
        return self.build_features(["items"], force)

    def download_images(self) -> BuildResult:
        """Fetch every item's image and record `image_files` (files already present and valid are skipped)."""
        from embeddings.images import ImageFilesBuilder
        from pipeline.registry import builders_for

        with self.writing("download-images") as store:
            context = BuildContext(store=store, config=self.config, progress=self.progress)
            run_builders(context, builders_for(self.config, ["items"]))
            return run_builders(context, [ImageFilesBuilder(self.config, force_download=True)], force=True)[0]

    def train(self, learners: list[str] | None = None, force: bool = False) -> list[BuildResult]:
        """Cross-fit base learners into oof__<learner> tables (each skipped when up to date)."""
        from pipeline.run import train_learners

        if not (learners or self.config.models.learners):
            raise UserError("no learners to train: models.learners is empty and no learner was named")
        with self.writing("train") as store:
            return train_learners(self.config, store, learners, force=force, progress=self.progress)

    def stack(self, trials: int | None = None, time_limit: float | None = None) -> StackRecord:
        """Train stale learners, tune the meta-learner, write predictions and the submission; the run record.
        `time_limit` (seconds): train what fits, cheapest first, and stack what finished (pipeline.run); the
        record's `schedule` says what was skipped or stopped and why."""
        return self._stack(trials, None if time_limit is None else Budget(_limit(time_limit)))

    def run(self, trials: int | None = None, time_limit: float | None = None
            ) -> tuple[list[BuildResult], StackRecord]:
        """build-features, then stack, under one `time_limit` (seconds) when given: the features come first (the
        learners read them), and the stack gets what they leave."""
        budget = None if time_limit is None else Budget(_limit(time_limit))
        self._check_stack(trials)
        built = self.build_features()
        if budget is not None and budget.left() <= 0:
            raise UserError(f"--time-limit {time_limit:g}: build-features alone took {budget.elapsed():.0f} s; give "
                            "more time or a faster preset (--preset fast); the feature tables are kept")
        return built, self._stack(trials, budget)

    def _check_stack(self, trials: int | None) -> Config:
        from pipeline.stack import check_stack_settings

        config = self.config if trials is None else edited(self.config, {"stacking.trials": trials})
        check_stack_settings(config)  # before any store is made or locked
        return config

    def _stack(self, trials: int | None, budget: Budget | None) -> StackRecord:
        from pipeline.run import train_and_stack

        config = self._check_stack(trials)
        with self.writing("stack") as store:
            return train_and_stack(config, store, config.stacking.trials, progress=self.progress, budget=budget)

    def predict_file(self, input_path: str | Path, out: str | Path) -> pl.DataFrame:
        """Price the rows of a CSV/Parquet file with the stored models; writes `out` (sample_id, price)."""
        from pipeline.predict import predict_file

        input_path, out = Path(input_path), Path(out)
        if not input_path.is_file():
            raise UserError(f"--input {input_path}: file not found")
        store = self.store()  # the store must exist: predict never makes one
        # The writer lock: loading the models must not meet a retrain halfway (predict itself writes nothing).
        with writer_lock(self.root.resolve(), "predict"):
            return predict_file(self.config, store, input_path, out, progress=self.progress)

    def predictor(self) -> Predictor:
        """The loaded stack (pipeline.online), kept for the next calls; a verb that retrains drops it."""
        # Imported here: the learners' libraries (torch, LightGBM, ...) load only for commands that predict.
        from pipeline.online import Predictor

        if self._predictor is None:
            self._predictor = Predictor(self.config, self.store())
        return self._predictor

    def predict(self, rows: pl.DataFrame, learners: bool = False) -> pl.DataFrame:
        """Price new rows given as a frame in the data file's columns (as `predict --input` reads them), nothing
        written: the path `predict` and `serve` take, so the prices are theirs for the same rows. `learners`:
        each base learner's price too."""
        if not isinstance(rows, pl.DataFrame):
            raise UserError(f"predict takes a polars DataFrame of new rows; got {type(rows).__name__}")
        return self.predictor().predict(rows, "rows", learners=learners)

    def sql(self, query: str, limit: int | None = None) -> pl.DataFrame:
        """Read-only SQL over the store's tables (the `sql` command's guard and sandbox)."""
        from sql.readonly import run_query

        return run_query(self.store(), query, limit=limit)

    def sql_arrow(self, query: str) -> pa.Table:
        return self.sql(query).to_arrow()

    def export(self, query: str, out: str | Path) -> int:
        """Stream a read-only query's result to .csv or .parquet; the row count."""
        from sql.readonly import export_query

        return export_query(self.store(), query, Path(out))

    def tables(self) -> pl.DataFrame:
        """The manifest: one row per table (rows, columns, builder, seconds, created_at, params, extra)."""
        return self.store().manifest()

    def record(self) -> StackRecord:
        """The run record of the stack whose predictions the store holds."""
        from stacking.record import StackRecord

        return StackRecord.of(self.store())

    def report(self, out: str | Path | None = None) -> Path:
        """The HTML report (default <store>/report.html)."""
        from stacking.report import build_report

        store = self.store()
        return build_report(store, Path(out) if out is not None else store.root / "report.html")
