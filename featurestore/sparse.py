"""Sparse tables in the store: each row's CSR slice as two list columns, `indices` (INTEGER[]) and `values`
(FLOAT[]), beside `sample_id`; the width (`n_features`) is in the table's manifest extras. Plain Parquet, so DuckDB
reads it (`SELECT sample_id, len(indices) FROM text_sparse`), and conversions go through Arrow buffers, so memory
stays proportional to the non-zeros: a sparse table is never densified.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp

from featurestore.errors import MissingTable, StaleTable
from featurestore.store import FeatureStore

SPARSE_COLUMNS = ("indices", "values")
# A sparse table's manifest extras may name a JSON file (`vocabulary`, relative to the store) whose
# COLUMN_NAMES_KEY lists a readable name per column, for importance reports.
COLUMN_NAMES_KEY = "column_names"


def sparse_column_names(store: FeatureStore, table: str) -> list[str]:
    """Readable column names of a sparse table ("name:word=leather"), or "<table>[i]" when it keeps none."""
    info = store.info(table)
    if info is None:
        raise MissingTable(f"sparse table {table} is not in the store at {store.root}; run build-features")
    if "vocabulary" in info.extra:
        payload = json.loads((store.root / info.extra["vocabulary"]).read_text())
        if COLUMN_NAMES_KEY in payload:
            return list(payload[COLUMN_NAMES_KEY])
    return [f"{table}[{i}]" for i in range(sparse_width(store, table))]


def is_sparse_table(store: FeatureStore, table: str) -> bool:
    info = store.info(table)
    return info is not None and "n_features" in info.extra and all(
        c in store.read_schema(table) for c in SPARSE_COLUMNS)


def sparse_width(store: FeatureStore, table: str) -> int:
    info = store.info(table)
    if info is None or "n_features" not in info.extra:
        raise MissingTable(f"sparse table {table} is not in the store at {store.root}; run build-features")
    return int(info.extra["n_features"])


def csr_to_frame(ids: pl.Series, matrix: sp.csr_matrix) -> pl.DataFrame:
    """CSR rows as list columns, built from the CSR arrays directly (no per-row Python objects)."""
    matrix = matrix.tocsr()
    matrix.sort_indices()
    offsets = pa.array(matrix.indptr.astype(np.int32))
    indices = pa.ListArray.from_arrays(offsets, pa.array(matrix.indices.astype(np.int32)))
    values = pa.ListArray.from_arrays(offsets, pa.array(matrix.data.astype(np.float32)))
    return pl.DataFrame({"sample_id": ids}).with_columns(
        indices=pl.from_arrow(indices), values=pl.from_arrow(values))


def frame_to_csr(frame: pl.DataFrame, n_columns: int) -> sp.csr_matrix:
    """The inverse of `csr_to_frame`, through Arrow buffers: memory stays proportional to the non-zeros."""
    indices = frame["indices"].to_arrow()
    values = frame["values"].to_arrow()
    if isinstance(indices, pa.ChunkedArray):
        indices = indices.combine_chunks()
        values = values.combine_chunks()
    offsets = np.asarray(indices.offsets, dtype=np.int64)
    value_offsets = np.asarray(values.offsets, dtype=np.int64)
    if not np.array_equal(np.diff(offsets), np.diff(value_offsets)):
        raise StaleTable("sparse table: a row has different numbers of indices and values")
    # A sliced Arrow list keeps its parent's child buffer: take the rows' span only.
    cols = np.asarray(indices.values, dtype=np.int32)[offsets[0]: offsets[-1]]
    data = np.asarray(values.values, dtype=np.float32)[value_offsets[0]: value_offsets[-1]]
    if len(cols) and (cols.min() < 0 or cols.max() >= n_columns):
        raise StaleTable(f"sparse table: column index outside 0..{n_columns - 1}; rebuild the table")
    return sp.csr_matrix((data, cols, offsets - offsets[0]), shape=(frame.height, n_columns))


def read_sparse(store: FeatureStore, table: str, ids: np.ndarray) -> sp.csr_matrix:
    """The sparse table's rows in the order of `ids` (every id must have a row)."""
    width = sparse_width(store, table)
    frame = store.read(table)
    order = pl.DataFrame({"sample_id": ids}).with_row_index("_row").join(frame, on="sample_id", how="left")
    if order.height != len(ids) or order["indices"].null_count():
        raise StaleTable(f"{table} has no row for {order['indices'].null_count()} items; rebuild it")
    return frame_to_csr(order.sort("_row"), width)
