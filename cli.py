"""Command line: `python cli.py --help`.

Every command reads the TOML config (`--config`, default configs/default.toml when present) and lets flags
override it. Data flows one way: raw rows -> feature tables -> out-of-fold predictions -> stacked predictions.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from featurestore.builders import BuildResult
from featurestore.errors import UserError
from pipeline.context import Context

if TYPE_CHECKING:
    from stacking.record import StackRecord

app = typer.Typer(help="Feature store + boosting/stacking service for catalog price prediction.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

# Errors that mean bad input, settings or store state rather than a bug here: one red line, exit 1. Our own code
# raises UserError subclasses (featurestore.errors) for those; OSError is the machine's (disk full, permissions, a
# path the user gave); the libraries below raise their own classes for bad input (a query error, bad LightGBM
# params, an image that does not decode). Anything else is a bug and keeps its traceback (a shape mismatch, CUDA
# out of memory); `--debug` keeps it for these too.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)
# Libraries' own error base classes, matched by class (a DuckDB error's class lives in `_duckdb`, which a match on
# module names missed: `sql` with a table-name typo printed a 30-line traceback). Looked up only in libraries this
# process imported: one that was never imported raised nothing.
LIBRARY_ERRORS = (("duckdb", "Error"), ("lightgbm.basic", "LightGBMError"), ("xgboost.core", "XGBoostError"),
                  ("catboost", "CatBoostError"), ("PIL", "UnidentifiedImageError"))
# onnxruntime's errors (Fail, InvalidArgument, NoSuchFile, ...) share no base class but their module.
KNOWN_LIBRARIES = ("onnxruntime",)
_debug = False

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config (default: configs/default.toml)")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="store folder (overrides store.dir)")]
TrainOpt = Annotated[str | None, typer.Option("--train", help="training file, CSV or Parquet (overrides data.train)")]
TestOpt = Annotated[str | None, typer.Option("--test", help="test file, CSV or Parquet (overrides data.test)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or info logs")]
EngineOpt = Annotated[str | None, typer.Option("--engine", help="where the batch loops run: local | ray "
                                                                  "(overrides engine.kind)")]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="recipe: best | medium | fast (overrides preset; "
                                                                   "pipeline/presets.py and the README say what each "
                                                                   "runs)")]
TimeLimitOpt = Annotated[float | None, typer.Option("--time-limit", help="seconds of wall clock: train what fits, "
                                                                          "cheapest first, and stack what finished")]
AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray cluster: \"\" = private local Ray, "
                                                                    "\"auto\" or host:port = join one")]


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for known errors too")] = False
             ) -> None:
    global _debug
    _debug = debug


def _context(config_path: Path | None, overrides: dict[str, Any], quiet: bool, learners: bool = True) -> Context:
    """The command's Context (pipeline.context): the config validated at load; `learners`: check every
    `[models.<name>]` section too (the commands that train or predict)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    return Context(config_path, overrides, progress=not quiet, learners=learners)


def _print_builds(results: list[BuildResult]) -> None:
    for result in results:
        typer.echo(f"{result.table:<28} {result.status:<7} {result.rows:>8} rows  {result.seconds:7.1f}s")


def _out_path(out: Path, force: bool) -> None:
    """Checked before any work: an --out that cannot be written fails in a second, not after the run."""
    if out.suffix not in (".csv", ".parquet"):
        raise UserError(f"--out {out}: expected a .csv or .parquet file name")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")


@app.command()
def ingest(config: ConfigOpt = None, store: StoreOpt = None, train: TrainOpt = None, test: TestOpt = None,
           force: bool = False, quiet: QuietOpt = False) -> None:
    """Validate the raw train/test files and write the `items` table."""
    _print_builds(_context(config, {"store.dir": store, "data.train": train, "data.test": test}, quiet).ingest(force))


@app.command("build-features")
def build_features(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    train: TrainOpt = None,
    test: TestOpt = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="run just these builders (repeatable)")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even when a table is up to date")] = False,
    quiet: QuietOpt = False, engine: EngineOpt = None, address: AddressOpt = None, preset: PresetOpt = None,
) -> None:
    """Ingest, then build every feature table in `builders` (each skipped when up to date)."""
    overrides = {"store.dir": store, "data.train": train, "data.test": test, "engine.kind": engine,
                 "engine.address": address, "preset": preset}
    ctx = _context(config, overrides, quiet)
    _print_builds(ctx.build_features(only, force))
    typer.echo(f"store: {ctx.root}  (SQL: python cli.py sql \"SELECT * FROM catalog LIMIT 5\")")


@app.command("download-images")
def download_images(config: ConfigOpt = None, store: StoreOpt = None, train: TrainOpt = None, test: TestOpt = None,
                    quiet: QuietOpt = False) -> None:
    """Fetch every item's image (threads, per-host limits, retries, size cap) and record `image_files`.

    Files already present and valid are skipped, so a rerun fetches only what failed."""
    ctx = _context(config, {"store.dir": store, "data.train": train, "data.test": test}, quiet)
    result = ctx.download_images()
    counts = ctx.store().info("image_files").extra.get("status_counts", {})  # type: ignore[union-attr]
    typer.echo(f"image_files  {result.rows} rows  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


@app.command()
def tables(config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """List the tables in the store: rows, columns, builder, age."""
    manifest = _context(config, {"store.dir": store}, True, learners=False).tables()
    if manifest.is_empty():
        typer.echo("the store is empty; run `python cli.py build-features`")
        return
    now = datetime.now(UTC).replace(tzinfo=None)
    typer.echo(f"{'table':<28} {'rows':>8} {'cols':>5}  {'builder':<24} {'seconds':>8}  age")
    for row in manifest.iter_rows(named=True):
        age = now - row["created_at"]
        typer.echo(
            f"{row['table_name']:<28} {row['row_count']:>8} {row['column_count']:>5}  {row['builder']:<24} "
            f"{row['seconds']:>8.1f}  {_human_age(age.total_seconds())}"
        )


def _human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="a SELECT query over the store's tables")],
    config: ConfigOpt = None,
    store: StoreOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="write the result to .csv or .parquet")] = None,
    force: Annotated[bool, typer.Option(help="overwrite --out if it exists")] = False,
    limit: Annotated[int, typer.Option(help="rows to print")] = 50,
) -> None:
    """Run read-only SQL over the feature store (every table is a view; no other file is reachable)."""
    import polars as pl

    if out is not None:
        _out_path(out, force)
    ctx = _context(config, {"store.dir": store}, True, learners=False)
    if out is not None:
        typer.echo(f"wrote {ctx.export(query, out)} rows to {out}")
        return
    result = ctx.sql(query, limit=limit)
    with pl.Config(tbl_rows=limit, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=160):
        typer.echo(result)


def _stack_summary(record: StackRecord) -> None:
    from models.metrics import leaderboard_score

    header = f"CV {record.metric.upper()}"
    typer.echo(f"{'model':<14} {header:>9}")
    for name, value in record.base_cv.items():
        typer.echo(f"{name:<14} {value:>9.2f}")
    typer.echo(f"{'mean blend':<14} {record.mean_blend_cv:>9.2f}")
    typer.echo(f"{'best single':<14} {record.best_single_cv:>9.2f}")
    typer.echo(f"{'best constant':<14} {record.best_constant_cv:>9.2f}")
    nested = "nested CV" if record.nested else "not nested: optimistic"
    typer.echo(f"{'stack':<14} {record.stack_cv:>9.2f}  ({record.best_meta} chosen of "
               f"{record.candidates} candidates, {nested}; {record.stack_seconds:.1f}s, "
               f"peak {record.peak_rss_mib:.0f} MiB)")
    if record.time_limit_s is not None:
        typer.echo(f"time limit {record.time_limit_s:.0f} s (preset {record.preset}): "
                   f"{record.total_seconds:.0f} s for learners + stack")
        for step in record.schedule:
            typer.echo(f"  {step['learner']:<14} {step['action']:<8} {step['reason']}")
    board = leaderboard_score(record.metric, record.stack_cv)
    if board is not None:
        typer.echo(f"{'leaderboard':<14} {board:>9.2f}  (max(0, 100 x (1 - MAPE)), the 2023 challenge's score)")


@app.command()
def train(
    config: ConfigOpt = None, store: StoreOpt = None,
    learner: Annotated[list[str] | None, typer.Option("--learner", help="only these learners (repeatable)")] = None,
    force: Annotated[bool, typer.Option(help="retrain even when oof__<learner> is up to date")] = False,
    quiet: QuietOpt = False, engine: EngineOpt = None, address: AddressOpt = None, preset: PresetOpt = None,
) -> None:
    """Cross-fit base learners into oof__<learner> tables (each skipped when up to date)."""
    ctx = _context(config, {"store.dir": store, "engine.kind": engine, "engine.address": address, "preset": preset},
                   quiet)
    results = ctx.train(learner, force=force)
    fs = ctx.store()
    for result in results:
        extra = fs.info(result.table).extra  # type: ignore[union-attr]
        typer.echo(f"{result.table:<20} {result.status:<7} OOF {extra['metric'].upper()} "
                       f"{extra['oof_score']:6.2f}  {result.seconds:6.1f}s")


@app.command()
def stack(
    config: ConfigOpt = None, store: StoreOpt = None,
    trials: Annotated[int | None, typer.Option(help="meta-learner candidates (default: stacking.trials)")] = None,
    quiet: QuietOpt = False, engine: EngineOpt = None, address: AddressOpt = None, preset: PresetOpt = None,
    time_limit: TimeLimitOpt = None,
) -> None:
    """Train stale base learners, tune the meta-learner with Optuna, write predictions + submission.csv."""
    overrides = {"store.dir": store, "stacking.trials": trials, "engine.kind": engine, "engine.address": address,
                 "preset": preset}
    record = _context(config, overrides, quiet).stack(time_limit=time_limit)
    _stack_summary(record)
    typer.echo(f"submission: {record.submission or '(no test rows)'}\nrun record: {record.run_record}")


@app.command()
def run(
    config: ConfigOpt = None, store: StoreOpt = None, train: TrainOpt = None, test: TestOpt = None,
    trials: Annotated[int | None, typer.Option(help="meta-learner candidates (default: stacking.trials)")] = None,
    quiet: QuietOpt = False, engine: EngineOpt = None, address: AddressOpt = None, preset: PresetOpt = None,
    time_limit: Annotated[float | None, typer.Option("--time-limit", help="seconds of wall clock for the whole "
                                                                           "run, build-features included")] = None,
) -> None:
    """build-features then stack, under one --time-limit when given (the whole pipeline's budget)."""
    overrides = {"store.dir": store, "data.train": train, "data.test": test, "stacking.trials": trials,
                 "engine.kind": engine, "engine.address": address, "preset": preset}
    results, record = _context(config, overrides, quiet).run(time_limit=time_limit)
    _print_builds(results)
    _stack_summary(record)
    typer.echo(f"submission: {record.submission or '(no test rows)'}\nrun record: {record.run_record}")


@app.command()
def predict(
    input: Annotated[Path, typer.Option("--input", help="new rows, CSV or Parquet (same columns as the test file)")],
    config: ConfigOpt = None, store: StoreOpt = None,
    out: Annotated[Path, typer.Option("--out", help="file to write (sample_id,price): .csv or .parquet")
                   ] = Path("predictions.csv"),
    force: Annotated[bool, typer.Option(help="overwrite --out if it exists")] = False,
    quiet: QuietOpt = False, engine: EngineOpt = None, address: AddressOpt = None, preset: PresetOpt = None,
) -> None:
    """Price new rows: same feature builders, stored fold models and stored meta-learner."""
    if not input.is_file():
        raise UserError(f"--input {input}: file not found")
    _out_path(out, force)
    overrides = {"store.dir": store, "engine.kind": engine, "engine.address": address, "preset": preset}
    predictions = _context(config, overrides, quiet).predict_file(input, out)
    typer.echo(f"wrote {predictions.height} predictions to {out}")


@app.command()
def serve(
    config: ConfigOpt = None, store: StoreOpt = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    max_body_mb: Annotated[float, typer.Option(help="largest request body accepted (413 above)")] = 10.0,
    quiet: QuietOpt = False, preset: PresetOpt = None,
) -> None:
    """Serve the stack over HTTP: POST /predict, GET /health, GET /version, POST /sql, POST /reload."""
    from pipeline.serve import serve as run_server

    ctx = _context(config, {"store.dir": store, "preset": preset}, quiet)
    ctx.store()  # the store must exist: serve never makes one
    typer.echo(f"serving {ctx.root} on http://{host}:{port}  (POST /predict, GET /version; Ctrl-C stops)")
    run_server(ctx, host, port, max_body_mb)


@app.command()
def report(
    config: ConfigOpt = None, store: StoreOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="HTML file (default <store>/report.html)")] = None,
) -> None:
    """HTML report: SMAPE per learner vs the stack, error by price band, GBDT importance, predicted vs true."""
    path = _context(config, {"store.dir": store}, True, learners=False).report(out)
    typer.echo(f"report: {path}")


def _library_errors() -> tuple[type[BaseException], ...]:
    found = []
    for module, name in LIBRARY_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def _is_known(exc: BaseException) -> bool:
    return (isinstance(exc, KNOWN_ERRORS + _library_errors())
            or type(exc).__module__.split(".")[0] in KNOWN_LIBRARIES)


# Usage errors: click's own, and the copy of click that typer >= 0.20 vendors (a missing `--input` raised
# typer._click's MissingParameter, which `click.ClickException` did not catch: a 54-line traceback).
USAGE_ERRORS: tuple[type[BaseException], ...] = tuple(
    {click.ClickException, getattr(getattr(typer, "_click", None), "ClickException", click.ClickException)})

ABORTS: tuple[type[BaseException], ...] = tuple({click.exceptions.Abort, getattr(typer.exceptions, "Abort",
                                                                                 click.exceptions.Abort)})


def main(argv: list[str] | None = None) -> int:
    """The one error boundary: a known error is one red line and exit 1; `--debug` re-raises it."""
    try:
        result = app(args=argv, standalone_mode=False)
    except USAGE_ERRORS as exc:  # usage errors: one line naming the option, exit code 2
        ctx = getattr(exc, "ctx", None)
        command = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
        usage = f"  (see `python cli.py{command} --help`)"
        typer.secho(f"error: {exc.format_message()}{usage}", fg=typer.colors.RED, err=True)  # type: ignore[attr-defined]
        return exc.exit_code  # type: ignore[attr-defined]
    except ABORTS:  # Ctrl-C at a prompt
        typer.secho("error: interrupted", fg=typer.colors.RED, err=True)
        return 130
    except Exception as exc:
        if _debug or not _is_known(exc):
            raise
        # Our own messages are written for the user (an ingest error lists its problems one per line); a
        # library's may span a page: one line of at most 500 characters, its class named.
        message = str(exc) if isinstance(exc, UserError) else " ".join(str(exc).split())[:500] or "interrupted"
        if not isinstance(exc, UserError | OSError):
            message = f"{type(exc).__name__}: {message}"
        typer.secho(f"error: {message}  (--debug shows the traceback)", fg=typer.colors.RED, err=True)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
