"""The feature store: one Parquet file per table, a DuckDB file exposing each table as a view, a manifest.

Every write goes to a temp file in the same folder and is renamed into place (`os.replace` is atomic on POSIX),
so a crash never leaves a half-written table visible; the manifest row is updated only after the rename.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from featurestore.errors import StoreBusy, StoreNotFound
from featurestore.lock import database_lock

MANIFEST_DDL = """
CREATE TABLE IF NOT EXISTS manifest (
    table_name VARCHAR PRIMARY KEY,
    builder VARCHAR,
    params JSON,
    fingerprint VARCHAR,
    row_count BIGINT,
    column_count INTEGER,
    seconds DOUBLE,
    versions JSON,
    created_at TIMESTAMP,
    extra JSON
)
"""
# What a table's fingerprint was computed from (code hash, params, upstream fingerprints, outside files), so a
# stale table can say *why* it is stale. Added after the first stores were made, hence ALTER.
MANIFEST_INPUTS_DDL = "ALTER TABLE manifest ADD COLUMN IF NOT EXISTS inputs JSON"

_VERSIONED_LIBRARIES = ("polars", "duckdb", "numpy", "pyarrow")


def library_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    versions = {}
    for name in _VERSIONED_LIBRARIES + extra:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_DUCKDB_ELEMENT_TYPES = {pl.Float32: "FLOAT", pl.Float64: "DOUBLE", pl.Int32: "INTEGER", pl.Int64: "BIGINT"}


def array_casts(schema: pl.Schema) -> list[str]:
    """Parquet has no fixed-size list, so DuckDB reads polars Arrays as LISTs; cast them back to ARRAYs so that
    array_cosine_similarity & co. work on embedding columns."""
    casts = []
    for column, dtype in schema.items():
        if isinstance(dtype, pl.Array) and dtype.inner in _DUCKDB_ELEMENT_TYPES:
            name = quote_ident(column)
            casts.append(f"{name}::{_DUCKDB_ELEMENT_TYPES[dtype.inner]}[{dtype.size}] AS {name}")
    return casts


def _path_literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _create_view(con: duckdb.DuckDBPyConnection, name: str, path: Path) -> None:
    # Views take no bound parameters, so the path goes in as an escaped literal. Absolute, so a plain
    # `duckdb store/features.duckdb` opened from any folder finds the files; a copied or moved store gets its
    # views re-pointed when it is next opened (FeatureStore.__init__).
    literal = _path_literal(path)
    casts = array_casts(pl.read_parquet_schema(path))
    replace = f" REPLACE ({', '.join(casts)})" if casts else ""
    con.execute(f"CREATE OR REPLACE VIEW {quote_ident(name)} AS SELECT *{replace} FROM read_parquet({literal})")


def file_sha256(path: Path) -> str:
    """The one file hash: raw input files, downloaded images, model weights."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` next to the target, fsync, then rename: readers see the old file or the new one, never half.

    The temp name keeps the real suffix (XGBoost picks its format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_parquet(df: pl.DataFrame, path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda tmp: df.write_parquet(tmp, compression="zstd", metadata=metadata))


# How long a connection waits for a process outside this tool that holds features.duckdb open.
LOCK_WAIT_S = 60.0

# Key in each table file's Parquet footer: the fingerprint it was written under. The manifest row is committed
# after the file's rename, so a crash between the two leaves a file whose footer disagrees with the manifest;
# `is_fresh` sees that and the table is rebuilt instead of trusted.
FINGERPRINT_KEY = "pricestack.fingerprint"


def file_fingerprint(path: Path) -> str | None:
    return pl.read_parquet_metadata(path).get(FINGERPRINT_KEY)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


@dataclass
class TableInfo:
    name: str
    builder: str
    fingerprint: str
    row_count: int
    column_count: int
    seconds: float
    created_at: datetime
    params: dict[str, Any]
    extra: dict[str, Any]
    inputs: dict[str, Any]


class FeatureStore:
    """A folder holding `tables/<name>.parquet`, `features.duckdb` (views + manifest) and scratch space."""

    def __init__(self, root: str | Path, create: bool = True) -> None:
        """Open the store at `root`; with `create=False` (read-only commands) a folder without one is an error
        instead of a new empty store."""
        self.root = Path(root).resolve()
        self.tables_dir = self.root / "tables"
        self.scratch_dir = self.root / "scratch"
        self.db_path = self.root / "features.duckdb"
        if not create and not self.db_path.is_file():
            raise StoreNotFound(f"no feature store at {self.root} (no features.duckdb there); check --store / "
                                "store.dir, or run `python cli.py build-features` first")
        if create:
            self.tables_dir.mkdir(parents=True, exist_ok=True)
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
        with self.connect(read_only=False) as con:  # idempotent; brings stores made before `inputs` up to date
            con.execute(MANIFEST_DDL)
            con.execute(MANIFEST_INPUTS_DDL)
        if self._views_elsewhere():
            self.refresh_views()

    # -- connections -------------------------------------------------------------------------------
    @contextmanager
    def connect(self, read_only: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
        # The database lock makes a reader wait for a writing connection (and the other way round) instead of
        # failing on DuckDB's own file lock.
        with database_lock(self.root, exclusive=not read_only):
            con = self._open(read_only)
            try:
                yield con
            finally:
                con.close()

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A process outside this tool (the plain `duckdb` client) may hold the file open: wait for it a while,
        then say who holds it, instead of DuckDB's raw lock error mid-build."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                return duckdb.connect(str(self.db_path), read_only=read_only)
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower():
                    raise
                if time.monotonic() > deadline:
                    found = re.search(r"held in (.*?\(PID \d+\))", str(exc))
                    holder = found.group(1) if found else "another process"
                    raise StoreBusy(f"{self.db_path} is held open by {holder}; close it (a `duckdb` shell?) and "
                                    "rerun") from None
                time.sleep(0.2)

    def _views_elsewhere(self) -> bool:
        """True when a view reads a Parquet file outside this store's folder: the store was copied or moved."""
        with self.connect(read_only=True) as con:
            sqls = [r[0] for r in con.execute("SELECT sql FROM duckdb_views() WHERE NOT internal").fetchall()]
        here = _path_literal(self.tables_dir)[:-1] + "/"
        return any(here not in sql for sql in sqls)

    # -- tables ------------------------------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"table name {name!r}: expected letters, digits, '_' or '-'")
        return self.tables_dir / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).is_file() and self.info(name) is not None

    def read(self, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        path = self.table_path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"table '{name}' is not in the store at {self.root}; run `python cli.py build-features` first"
            )
        return pl.read_parquet(path, columns=columns)

    def write(
        self,
        name: str,
        df: pl.DataFrame,
        *,
        builder: str,
        params: dict[str, Any],
        fingerprint: str,
        seconds: float,
        extra: dict[str, Any] | None = None,
        extra_versions: tuple[str, ...] = (),
        inputs: dict[str, Any] | None = None,
    ) -> None:
        path = self.table_path(name)
        atomic_write_parquet(df, path, {FINGERPRINT_KEY: fingerprint})
        with self.connect(read_only=False) as con:
            con.execute("BEGIN")
            _create_view(con, name, path)
            con.execute(
                "INSERT OR REPLACE INTO manifest (table_name, builder, params, fingerprint, row_count, column_count, "
                "seconds, versions, created_at, extra, inputs) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    name,
                    builder,
                    json.dumps(params, sort_keys=True, default=str),
                    fingerprint,
                    df.height,
                    df.width,
                    round(seconds, 3),
                    json.dumps(library_versions(extra_versions)),
                    datetime.now(UTC).replace(tzinfo=None),
                    json.dumps(extra or {}, default=str),
                    json.dumps(inputs or {}, sort_keys=True, default=str),
                ],
            )
            con.execute("COMMIT")

    def info(self, name: str) -> TableInfo | None:
        with self.connect(read_only=True) as con:
            row = con.execute(
                "SELECT table_name, builder, fingerprint, row_count, column_count, seconds, created_at, "
                "params, extra, inputs FROM manifest WHERE table_name = ?",
                [name],
            ).fetchone()
        if row is None:
            return None
        return TableInfo(
            name=row[0],
            builder=row[1],
            fingerprint=row[2],
            row_count=row[3],
            column_count=row[4],
            seconds=row[5],
            created_at=row[6],
            params=json.loads(row[7]),
            extra=json.loads(row[8]),
            inputs=json.loads(row[9]) if row[9] else {},
        )

    def is_fresh(self, name: str, fingerprint: str) -> bool:
        info = self.info(name)
        path = self.table_path(name)
        return (info is not None and info.fingerprint == fingerprint and path.is_file()
                and file_fingerprint(path) == fingerprint)

    def manifest(self) -> pl.DataFrame:
        with self.connect(read_only=True) as con:
            return con.sql("SELECT * FROM manifest ORDER BY created_at").pl()

    def refresh_views(self) -> None:
        """Re-point every view at its Parquet file (after the store folder was moved or copied)."""
        with self.connect(read_only=False) as con:
            names = [r[0] for r in con.execute("SELECT table_name FROM manifest").fetchall()]
            for name in names:
                path = self.table_path(name)
                if path.is_file():
                    _create_view(con, name, path)

    # -- layout: every folder the store holds besides its tables, named here only ------------------------
    def models_dir(self, owner: str) -> Path:
        """Saved models of one learner (`models/<learner>/<fingerprint>/`) or of the stack (`models/stack/`)."""
        return self.root / "models" / owner

    def artifacts_dir(self, table: str) -> Path:
        """Files a builder writes beside its table (the sparse text vocabulary)."""
        return self.root / "artifacts" / table

    @property
    def runs_dir(self) -> Path:
        """One JSON run record per `stack`."""
        return self.root / "runs"

    @property
    def journal_path(self) -> Path:
        """The stack study's Optuna journal (scores of finished candidates, for resuming)."""
        return self.root / "optuna.journal"

    def derived_dir(self, name: str) -> Path:
        """A store `predict` derives from this one for a file of new rows."""
        return self.root / "predict" / name

    def scratch(self, name: str) -> Path:
        path = self.scratch_dir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
