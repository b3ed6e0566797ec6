"""The feature store: one Parquet file per table, a DuckDB file exposing each table as a view, a manifest.

Every write goes to a temp file in the same folder and is renamed into place (`os.replace` is atomic on POSIX),
so a crash never leaves a half-written table visible; the manifest row is updated only after the rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
import pyarrow as pa
import pyarrow.parquet as pq

from featurestore.engine import in_worker
from featurestore.errors import EngineError, InputError, IntegrityError, MissingTable, StoreBusy, StoreNotFound
from featurestore.lock import database_lock, pid_alive

log = logging.getLogger(__name__)

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
# sha256 of the table's Parquet file as written: a table whose file has other bytes is neither reused nor read.
MANIFEST_SHA_DDL = "ALTER TABLE manifest ADD COLUMN IF NOT EXISTS file_sha256 VARCHAR"

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


def verify_file(path: Path, expected: str, fix: str) -> None:
    """Refuse a stored file whose sha256 is not the one recorded when it was written (one flipped bit in a
    LightGBM leaf or a meta-learner weight changed every price with exit 0)."""
    if not path.is_file():
        raise IntegrityError(f"{path} is missing; {fix}")
    actual = file_sha256(path)
    if actual != expected:
        raise IntegrityError(f"{path} is damaged (sha256 {actual[:12]}... but {expected[:12]}... was recorded "
                             f"when it was written); {fix}")


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
    """Written by pyarrow with a CRC per data page (polars' writer has none), so any reader that verifies pages
    (the `sql` sandbox, `FeatureStore.read`) refuses a flipped bit instead of returning another number."""
    table = df.to_arrow()
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k.encode(): v.encode() for k, v in metadata.items()}})
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", write_page_checksum=True))


def read_parquet_verified(path: Path, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a Parquet file checking every page's CRC; a damaged file is an IntegrityError naming it."""
    try:
        return pl.from_arrow(pq.read_table(path, columns=columns, page_checksum_verification=True))  # type: ignore[return-value]
    except (OSError, pa.ArrowException) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise IntegrityError(f"{path} is damaged ({' '.join(str(exc).split())[:200]}); rebuild it: "
                             "`python cli.py build-features --force`") from exc


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
    file_sha256: str | None = None  # None: written before files were hashed (trusted, cannot be checked)


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
        self.read_only = not create
        if create:
            self.tables_dir.mkdir(parents=True, exist_ok=True)
            self.scratch_dir.mkdir(parents=True, exist_ok=True)
            self.remove_dead_temp_files()
            with self.connect(read_only=False) as con:  # idempotent; brings older stores' manifests up to date
                con.execute(MANIFEST_DDL)
                con.execute(MANIFEST_INPUTS_DDL)
                con.execute(MANIFEST_SHA_DDL)
        # Read-only commands (`tables`, `sql`, `report`) never open the file for writing: they work on a store
        # they cannot write (a read-only mount) and beside a read-only `duckdb` client. An older store's
        # manifest may lack the newer columns then.
        with self.connect(read_only=True) as con:
            self._manifest_columns = {r[0] for r in con.execute(
                "SELECT column_name FROM duckdb_columns() WHERE table_name = 'manifest'").fetchall()}
        if self._views_elsewhere():
            # A copied or moved store: re-point its views once, so the plain `duckdb` client reads this copy. A
            # read-only command that cannot write here goes on (it reads the Parquet files, not the views).
            try:
                self.refresh_views()
            except (duckdb.Error, OSError, StoreBusy) as exc:
                if create:
                    raise
                log.info("could not re-point the views of the moved store %s (%s); the CLI does not need them",
                         self.root, exc)

    def remove_dead_temp_files(self) -> list[Path]:
        """Temp files (`.tmp-<pid>-<name>`) of writers that died mid-write (kill -9): they are never renamed into
        place, so they are only litter. A live writer's temp files are left alone."""
        removed = []
        for path in self.root.rglob(".tmp-*"):
            pid = path.name.split("-")[1] if path.name.count("-") >= 2 else ""
            if path.is_file() and pid.isdigit() and not pid_alive(int(pid)):
                path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            log.info("removed %d temp file(s) left by writers that did not finish", len(removed))
        return removed

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

    def _refuse_in_worker(self, what: str) -> None:
        """The single-writer rule: units on workers get data and return data; only the main process touches the
        store's database and tables (two writers would interleave manifest rows; a remote node may not even see
        this folder)."""
        if in_worker():
            raise EngineError(f"an engine worker tried to {what} the store at {self.root}; workers get their data "
                              "from the main process and return results to it (engine.md's single-writer rule)")

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        self._refuse_in_worker("open the DuckDB file of")
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
            raise InputError(f"table name {name!r}: expected letters, digits, '_' or '-'")
        return self.tables_dir / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).is_file() and self.info(name) is not None

    def read(self, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        path = self.table_path(name)
        if not path.is_file():
            raise MissingTable(
                f"table '{name}' is not in the store at {self.root}; run `python cli.py build-features` first"
            )
        info = self.info(name)
        if info is not None:
            self._verify(path, info)
        return read_parquet_verified(path, columns)

    def read_schema(self, name: str) -> pl.Schema:
        return pl.read_parquet_schema(self.table_path(name))

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
        self._refuse_in_worker(f"write table {name} to")
        path = self.table_path(name)
        if "sample_id" in df.columns and df["sample_id"].is_duplicated().any():
            # One row per item is what every join on sample_id assumes: a builder that repeats ids has a bug.
            repeated = df.filter(df["sample_id"].is_duplicated())["sample_id"].unique().head(3).to_list()
            raise ValueError(f"table {name}: repeated sample_ids {repeated}; a table holds one row per item")
        atomic_write_parquet(df, path, {FINGERPRINT_KEY: fingerprint})
        digest = file_sha256(path)
        _VERIFIED[_stat_key(path)] = digest  # just written and hashed: this process need not hash it again
        with self.connect(read_only=False) as con:
            con.execute("BEGIN")
            _create_view(con, name, path)
            con.execute(
                "INSERT OR REPLACE INTO manifest (table_name, builder, params, fingerprint, row_count, column_count, "
                "seconds, versions, created_at, extra, inputs, file_sha256) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                    digest,
                ],
            )
            con.execute("COMMIT")

    def info(self, name: str) -> TableInfo | None:
        with self.connect(read_only=True) as con:
            row = con.execute(
                "SELECT table_name, builder, fingerprint, row_count, column_count, seconds, created_at, "
                f"params, extra, {self._optional('inputs')}, {self._optional('file_sha256')} FROM manifest "
                "WHERE table_name = ?",
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
            file_sha256=row[10],
        )

    def _optional(self, column: str) -> str:
        return column if column in self._manifest_columns else f"NULL AS {column}"

    def is_fresh(self, name: str, fingerprint: str) -> bool:
        """Up to date and undamaged: a table file with other bytes than recorded is rebuilt, not "reused"."""
        info = self.info(name)
        path = self.table_path(name)
        if not (info is not None and info.fingerprint == fingerprint and _plain_file(path)):
            return False
        try:
            self._verify(path, info)
        except IntegrityError as exc:
            log.warning("%s; rebuilding it", exc)
            return False
        return file_fingerprint(path) == fingerprint

    def verify_tables(self, names: list[str]) -> None:
        """Each table's file still has the bytes recorded in the manifest (IntegrityError otherwise)."""
        for name in names:
            info = self.info(name)
            if info is not None:
                self._verify(self.table_path(name), info)

    def _verify(self, path: Path, info: TableInfo) -> None:
        if path.is_symlink():
            raise IntegrityError(f"{path} is a symbolic link; a table file must be the store's own file. Remove "
                                 "it and rebuild: `python cli.py build-features --force`")
        if info.file_sha256 is None:
            return
        key = _stat_key(path)
        if _VERIFIED.get(key) == info.file_sha256:
            return
        verify_file(path, info.file_sha256, "rebuild it: `python cli.py build-features --force`")
        _VERIFIED[key] = info.file_sha256

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


# Files hashed by this process, keyed by path, inode, size and mtime: each table is hashed once per process.
_VERIFIED: dict[tuple[str, int, int, int], str] = {}


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
