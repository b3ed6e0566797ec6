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

import duckdb
import polars as pl
import pyarrow.dataset as ds

from featurestore.errors import UserError
from featurestore.store import FeatureStore, array_casts, quote_ident

EXPLAIN_ANALYZE = re.compile(r"^\s*EXPLAIN\s*(\(\s*)?ANALY[SZ]E\b", re.IGNORECASE)
EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN\s+", re.IGNORECASE)


class ReadOnlyViolation(UserError, PermissionError):
    """A statement that could write or reach beyond the store's tables."""


def _statements(query: str) -> list[duckdb.Statement]:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.ParserException as exc:
        raise ValueError(f"SQL does not parse: {exc}") from exc
    if not statements:
        raise ValueError("no SQL statement given")
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
    for name in manifest["table_name"].to_list():
        path = store.table_path(name)
        if not path.is_file():
            continue
        raw = f"__raw_{name}"
        con.register(raw, ds.dataset(str(path), format="parquet"))
        casts = array_casts(pl.read_parquet_schema(path))
        replace = f" REPLACE ({', '.join(casts)})" if casts else ""
        con.execute(f"CREATE VIEW {quote_ident(name)} AS SELECT *{replace} FROM {quote_ident(raw)}")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def run_query(store: FeatureStore, query: str) -> pl.DataFrame:
    check_read_only(query)
    con = sandbox(store)
    try:
        relation = con.sql(query)
        if relation is None:
            raise ValueError("the statement returned no rows to show")
        return relation.pl()
    finally:
        con.close()
