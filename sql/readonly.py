"""Run a user's SQL against the store, read-only, on a connection that cannot reach the file system.

Three locks:
1. Only queries: SELECT, and EXPLAIN of a SELECT without ANALYZE (EXPLAIN ANALYZE *executes* its statement, so
   `EXPLAIN ANALYZE COPY ... TO 'x'` wrote files through the old read-only check).
2. The user's SQL runs on a fresh in-memory DuckDB where the store's tables are registered as Arrow datasets
   (scanned by Arrow, not by DuckDB's file system), with `enable_external_access = false`: `read_csv('/etc/passwd')`,
   `read_text`, `read_blob`, `glob`, `COPY ... TO`, `ATTACH` and extensions all fail.
3. `lock_configuration = true`, so the query cannot switch the access back on.
The store's own DuckDB file is never opened for writing here.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from featurestore.errors import InputError, IntegrityError, UserError
from featurestore.store import FeatureStore, array_casts, atomic_write, quote_ident

EXPLAIN_ANALYZE = re.compile(r"^\s*EXPLAIN\s*(\(\s*)?ANALY[SZ]E\b", re.IGNORECASE)
EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN\s+", re.IGNORECASE)


class ReadOnlyViolation(UserError, PermissionError):
    """A statement that could write or reach beyond the store's tables."""


def _statements(query: str) -> list[duckdb.Statement]:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.ParserException as exc:
        raise InputError(f"SQL does not parse: {exc}") from exc
    if not statements:
        raise InputError("no SQL statement given")
    return statements


def check_read_only(query: str) -> None:
    for statement in _statements(query):
        if statement.type == duckdb.StatementType.EXPLAIN:
            if EXPLAIN_ANALYZE.match(statement.query):
                raise ReadOnlyViolation("refused EXPLAIN ANALYZE: it executes its statement; `sql` runs only "
                                        "SELECT (and plain EXPLAIN of a SELECT)")
            inner = _statements(EXPLAIN_PREFIX.sub("", statement.query, count=1))
            if any(s.type != duckdb.StatementType.SELECT for s in inner):
                raise ReadOnlyViolation("refused EXPLAIN of a non-SELECT statement: `sql` is read-only")
        elif statement.type != duckdb.StatementType.SELECT:
            raise ReadOnlyViolation(f"refused {statement.type.name} statement: `sql` is read-only and runs only "
                                    "SELECT/EXPLAIN queries")


def sandbox(store: FeatureStore) -> duckdb.DuckDBPyConnection:
    """An in-memory connection with the store's tables (and manifest) as views, and no file-system access."""
    con = duckdb.connect(":memory:")
    manifest = store.manifest()
    con.register("manifest", manifest.to_arrow())
    # Every page read is checked against its CRC: a damaged table fails the query instead of answering.
    parquet = ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))
    for name in manifest["table_name"].to_list():
        path = store.table_path(name)
        if not path.is_file():
            continue
        if path.is_symlink():  # a link planted in tables/ would expose any file the user can read
            raise IntegrityError(f"{path} is a symbolic link, not a table the store wrote; remove it and rebuild "
                                 "(`python cli.py build-features --force`)")
        raw = f"__raw_{name}"
        con.register(raw, ds.dataset(str(path), format=parquet))
        casts = array_casts(pl.read_parquet_schema(path))
        replace = f" REPLACE ({', '.join(casts)})" if casts else ""
        con.execute(f"CREATE VIEW {quote_ident(name)} AS SELECT *{replace} FROM {quote_ident(raw)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_query(store: FeatureStore, query: str, limit: int | None = None) -> pl.DataFrame:
    """The query's rows; with `limit`, only the first `limit` are fetched (a 10M-row result is not materialised
    to print 50 lines)."""
    check_read_only(query)
    con = sandbox(store)
    try:
        relation = _relation(con, query)
        return (relation.limit(limit) if limit is not None else relation).pl()
    finally:
        con.close()


def export_query(store: FeatureStore, query: str, out: Path) -> int:
    """Stream the query's result into `out` (.csv or .parquet) batch by batch, atomically; the row count."""
    check_read_only(query)
    con = sandbox(store)
    rows = 0

    def write(tmp: Path) -> None:
        nonlocal rows
        reader = _relation(con, query).fetch_record_batch(rows_per_batch=65_536)
        writer = (pq.ParquetWriter(tmp, reader.schema) if out.suffix == ".parquet"
                  else pacsv.CSVWriter(tmp, reader.schema))
        with writer:
            for batch in reader:
                writer.write_batch(batch)
                rows += batch.num_rows

    try:
        atomic_write(out, write)
    finally:
        con.close()
    return rows


def _relation(con: duckdb.DuckDBPyConnection, query: str) -> duckdb.DuckDBPyRelation:
    relation = con.sql(query)
    if relation is None:
        raise InputError("the statement returned no rows to show")
    return relation
