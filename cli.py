"""Command line: `python cli.py --help`.

Every command reads the TOML config (`--config`, default configs/default.toml when present) and lets flags
override it. Data flows one way: raw rows -> feature tables -> out-of-fold predictions -> stacked predictions.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from features.base import BuildContext, run_builders
from features.ingest import IngestError
from featurestore.config import Config, ConfigError, load_config
from featurestore.store import FeatureStore

app = typer.Typer(help="Feature store + boosting/stacking service for catalog price prediction.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

DEFAULT_CONFIG = Path("configs/default.toml")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config (default: configs/default.toml)")]
StoreOpt = Annotated[str | None, typer.Option("--store", help="store folder (overrides store.dir)")]
TrainOpt = Annotated[str | None, typer.Option("--train", help="training file, CSV or Parquet (overrides data.train)")]
TestOpt = Annotated[str | None, typer.Option("--test", help="test file, CSV or Parquet (overrides data.test)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or info logs")]


def _setup(config_path: Path | None, overrides: dict[str, Any], quiet: bool) -> tuple[Config, FeatureStore]:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    if config_path is None and DEFAULT_CONFIG.is_file():
        config_path = DEFAULT_CONFIG
    try:
        config = load_config(config_path, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    return config, FeatureStore(config.store.dir)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _run(config: Config, store: FeatureStore, names: list[str] | None, force: bool, quiet: bool) -> None:
    from features.registry import builders_for

    try:
        builders = builders_for(config, names)
        results = run_builders(BuildContext(store=store, config=config, progress=not quiet), builders, force=force)
    except (IngestError, ValueError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
    for result in results:
        typer.echo(f"{result.table:<28} {result.status:<7} {result.rows:>8} rows  {result.seconds:7.1f}s")


@app.command()
def ingest(config: ConfigOpt = None, store: StoreOpt = None, train: TrainOpt = None, test: TestOpt = None,
           force: bool = False, quiet: QuietOpt = False) -> None:
    """Validate the raw train/test files and write the `items` table."""
    cfg, fs = _setup(config, {"store.dir": store, "data.train": train, "data.test": test}, quiet)
    _run(cfg, fs, ["items"], force, quiet)


@app.command("build-features")
def build_features(
    config: ConfigOpt = None,
    store: StoreOpt = None,
    train: TrainOpt = None,
    test: TestOpt = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="run just these builders (repeatable)")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even when a table is up to date")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Ingest, then build every feature table in `builders` (each skipped when up to date)."""
    cfg, fs = _setup(config, {"store.dir": store, "data.train": train, "data.test": test}, quiet)
    _run(cfg, fs, only, force, quiet)
    typer.echo(f"store: {fs.root}  (SQL: python cli.py sql \"SELECT * FROM catalog LIMIT 5\")")


@app.command("download-images")
def download_images(config: ConfigOpt = None, store: StoreOpt = None, train: TrainOpt = None, test: TestOpt = None,
                    quiet: QuietOpt = False) -> None:
    """Fetch every item's image (threads, per-host limits, retries, size cap) and record `image_files`.

    Files already present and valid are skipped, so a rerun fetches only what failed."""
    from embeddings.images import ImageFilesBuilder

    cfg, fs = _setup(config, {"store.dir": store, "data.train": train, "data.test": test}, quiet)
    _run(cfg, fs, ["items"], False, quiet)
    try:
        results = run_builders(BuildContext(store=fs, config=cfg, progress=not quiet),
                               [ImageFilesBuilder(cfg, force_download=True)], force=True)
    except (ValueError, RuntimeError) as exc:
        _fail(str(exc))
    counts = fs.info("image_files").extra.get("status_counts", {})
    typer.echo(f"image_files  {results[0].rows} rows  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


@app.command()
def tables(config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """List the tables in the store: rows, columns, builder, age."""
    _, fs = _setup(config, {"store.dir": store}, True)
    manifest = fs.manifest()
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
    limit: Annotated[int, typer.Option(help="rows to print")] = 50,
) -> None:
    """Run read-only SQL over the feature store (every table is a view)."""
    import polars as pl

    from sql.readonly import ReadOnlyViolation, run_query

    _, fs = _setup(config, {"store.dir": store}, True)
    try:
        result = run_query(fs, query)
    except ReadOnlyViolation as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - DuckDB raises many error classes; all are the user's query
        _fail(f"query failed: {exc}")
    if out is not None:
        if out.suffix == ".csv":
            result.write_csv(out)
        elif out.suffix == ".parquet":
            result.write_parquet(out)
        else:
            _fail(f"--out {out}: expected a .csv or .parquet file name")
        typer.echo(f"wrote {result.height} rows to {out}")
        return
    with pl.Config(tbl_rows=limit, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=160):
        typer.echo(result)


if __name__ == "__main__":
    app()
