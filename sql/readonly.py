"""Run a user's SQL against the store read-only.

Two locks: the DuckDB file is opened read_only (no DDL/DML on the database), and only query statements are
accepted, because a read-only database still lets `COPY ... TO` or `ATTACH` write files elsewhere.
"""

from __future__ import annotations

import duckdb
import polars as pl

from featurestore.store import FeatureStore

ALLOWED = {
    duckdb.StatementType.SELECT,
    duckdb.StatementType.EXPLAIN,
}


class ReadOnlyViolation(PermissionError):
    pass


def check_read_only(query: str) -> None:
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.ParserException as exc:
        raise ValueError(f"SQL does not parse: {exc}") from exc
    if not statements:
        raise ValueError("no SQL statement given")
    for statement in statements:
        if statement.type not in ALLOWED:
            kind = statement.type.name
            raise ReadOnlyViolation(
                f"refused {kind} statement: `sql` is read-only and runs only SELECT/EXPLAIN queries"
            )


def run_query(store: FeatureStore, query: str) -> pl.DataFrame:
    check_read_only(query)
    with store.connect(read_only=True) as con:
        # Freeze settings so a query cannot re-enable anything; SELECT can still read files, never write.
        con.execute("SET lock_configuration = true")
        relation = con.sql(query)
        if relation is None:
            raise ValueError("the statement returned no rows to show")
        return relation.pl()
