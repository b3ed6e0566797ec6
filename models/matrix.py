"""Feature matrices for the learners: named tables joined on sample_id by DuckDB, then a fitted column spec.

Columns are qualified as "<table>.<column>" so two tables may both hold `embedding`. The spec is fitted on the
training rows only and saved beside the models (JSON), so `predict` turns new rows into exactly the same columns:
numbers and booleans pass through, strings with few distinct training values become category codes (unseen -> NaN),
longer strings (item names, descriptions) are dropped, and array columns (embeddings) expand to one column per
dimension. Sparse tables (`text_sparse`) are not joined as columns: they are read as CSR in the frame's row order
and hstacked after the dense block by the learners that read them (`Inputs.sparse`), never densified.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from featurestore.builders import in_row_order
from featurestore.errors import ConfigError, MissingTable, StaleTable
from featurestore.names import FOLDS, ITEMS, feature_table_problem, label_column_problem
from featurestore.sparse import frame_to_csr, is_sparse_table, read_sparse, sparse_width
from featurestore.store import FeatureStore, quote_ident
from models.base import Inputs

KEY_COLUMNS = ("sample_id", "split", "price", "fold", "group_id")


def split_tables(store: FeatureStore, tables: list[str]) -> tuple[list[str], list[str]]:
    """(dense tables, sparse tables) of a feature set; every table must be in the store and a feature table
    (the config refuses `items`, `folds` & co. at load; this catches a config built in code)."""
    for table in tables:
        problem = feature_table_problem(table)
        if problem:
            raise ConfigError(f"feature set {tables}: {problem}")
    missing = [t for t in tables if not store.has_table(t)]
    if missing:
        raise MissingTable(
            f"feature table(s) {missing} are not in the store at {store.root}; build them with "
            "`python cli.py build-features` (or take them out of the learner's `tables`)"
        )
    sparse = [t for t in tables if is_sparse_table(store, t)]
    return [t for t in tables if t not in sparse], sparse


def load_frame(store: FeatureStore, tables: list[str]) -> pl.DataFrame:
    """items (+ folds) left-joined with every dense table, one row per item, ordered by sample_id."""
    dense, _ = split_tables(store, tables)
    store.verify_tables([ITEMS, FOLDS, *dense])  # DuckDB's scan checks no page CRC: the file hashes do
    select: list[str] = []
    joins = []
    for number, table in enumerate(dense):
        alias = f"t{number}"
        schema = store.read_schema(table)
        leaked = [c for c in schema if label_column_problem(c)]
        if leaked:
            raise ConfigError(f"table {table} holds {leaked}, the target or the fold plan; a feature table must not "
                              "(rebuild it without those columns, or take it out of the learner's tables)")
        select += [f"{alias}.{quote_ident(c)} AS {quote_ident(f'{table}.{c}')}" for c in schema if c != "sample_id"]
        joins.append(left_join(table, alias))
    return query_items(store, select, joins)


def left_join(table: str, alias: str) -> str:
    return f"LEFT JOIN {quote_ident(table)} {alias} ON {alias}.sample_id = i.sample_id"


def query_items(store: FeatureStore, select: list[str], joins: list[str]) -> pl.DataFrame:
    """One row per item (alias `i`) with KEY_COLUMNS first (fold -1 on test rows), then `select` over `joins`."""
    columns = ["i.sample_id", "i.split", "i.price", "coalesce(f.fold, -1)::INTEGER AS fold",
               "i.group_id::VARCHAR AS group_id", *select]
    query = (f"SELECT {', '.join(columns)} FROM items i LEFT JOIN folds f ON f.sample_id = i.sample_id "
             f"{' '.join(joins)} ORDER BY i.sample_id")
    with store.connect(read_only=True) as con:
        frame = con.sql(query).pl()
        items = con.execute("SELECT count(*) FROM items").fetchone()[0]  # type: ignore[index]
    if frame.height != items:
        # A table with two rows for one id would fan the join out and silently weight that item twice.
        raise StaleTable(f"joining {', '.join(j.split()[2] for j in joins) or 'folds'} onto items gave "
                           f"{frame.height} rows for {items} items: a joined table has repeated sample_ids; "
                           "rebuild it (python cli.py build-features --force)")
    return frame


def item_texts(store: FeatureStore, frame: pl.DataFrame) -> np.ndarray:
    """The items' labelled text in `frame`'s row order (object array), for learners that read text."""
    texts = store.read("items", columns=["sample_id", "text"])
    joined = frame.select("sample_id").join(texts, on="sample_id", how="left", maintain_order="left")
    return joined["text"].fill_null("").to_numpy().astype(object)


@dataclass
class MatrixSpec:
    tables: list[str]
    numeric: list[str] = field(default_factory=list)
    categorical: dict[str, list[str]] = field(default_factory=dict)
    arrays: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    sparse: dict[str, int] = field(default_factory=dict)  # sparse table -> its width, hstacked after the dense
    # sparse table -> the columns kept (a learner's `max_sparse_columns` cap); absent = all columns
    sparse_columns: dict[str, list[int]] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        names = list(self.numeric) + list(self.categorical)
        for column, dim in self.arrays.items():
            names += [f"{column}[{i}]" for i in range(dim)]
        for table, width in self.sparse.items():
            names += [f"{table}[{i}]" for i in self.sparse_columns.get(table, range(width))]
        return names

    @property
    def n_dense(self) -> int:
        return len(self.numeric) + len(self.categorical) + sum(self.arrays.values())

    @property
    def categorical_indices(self) -> list[int]:
        return list(range(len(self.numeric), len(self.numeric) + len(self.categorical)))

    def codes(self, column: str) -> dict[str, float]:
        """A categorical column's value -> code, made once per spec instead of once per `transform` call (a
        served model transforms a few rows per call; the vocabulary can hold up to max_categories strings)."""
        cache = self.__dict__.setdefault("_codes", {})  # not a field: neither saved nor compared
        if column not in cache:
            cache[column] = {value: float(code) for code, value in enumerate(self.categorical[column])}
        return cache[column]

    def signature(self) -> str:
        """The spec's content as one string (made once): specs fitted on the same columns have the same one."""
        if "_signature" not in self.__dict__:  # not a field: neither saved nor compared
            self.__dict__["_signature"] = json.dumps(asdict(self), sort_keys=True)
        return self.__dict__["_signature"]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> MatrixSpec:
        return cls(**json.loads(path.read_text()))


def fit_spec(train: pl.DataFrame, tables: list[str], max_categories: int,
             sparse: dict[str, int] | None = None) -> MatrixSpec:
    spec = MatrixSpec(tables=list(tables), sparse=dict(sparse or {}))
    for column, dtype in train.schema.items():
        if column in KEY_COLUMNS:
            continue
        if isinstance(dtype, pl.Array):
            spec.arrays[column] = dtype.size
        elif dtype.is_numeric() or dtype == pl.Boolean:
            spec.numeric.append(column)
        elif dtype in (pl.String, pl.Categorical):
            values = train[column].drop_nulls().unique().sort().to_list()
            if 0 < len(values) <= max_categories:
                spec.categorical[column] = [str(v) for v in values]
            else:
                spec.dropped.append(column)
        else:
            spec.dropped.append(column)
    _refuse_copies_of_the_target(train, spec.numeric)
    return spec


def _refuse_copies_of_the_target(train: pl.DataFrame, numeric: list[str]) -> None:
    """A feature column equal to the price (or its log) on every training row is the label under another name
    (a user's builder that copied it): refused, not trained on."""
    if "price" not in train.columns or train.height < 2:
        return
    price = train["price"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    copies = {"price": price, "log1p(price)": np.log1p(price), "log(price)": np.log(price)}
    for column in numeric:
        values = train[column].cast(pl.Float64).fill_null(np.nan).to_numpy()
        present = np.isfinite(values) & np.isfinite(price)
        if present.sum() < max(2, 0.9 * len(values)):
            continue
        for what, target in copies.items():
            if np.allclose(values[present], target[present], rtol=1e-6, atol=1e-9):
                raise ConfigError(f"feature column {column} equals {what} on every training row: it is the target "
                                  "under another name; take its table out of the learner's tables")


def transform(spec: MatrixSpec, frame: pl.DataFrame) -> np.ndarray:
    """float32 matrix with spec.feature_names columns; nulls and unseen categories are NaN."""
    missing = [c for c in [*spec.numeric, *spec.categorical, *spec.arrays] if c not in frame.columns]
    if missing:
        raise StaleTable(f"feature columns {missing[:5]} (of {len(missing)}) are missing from the tables "
                         f"{spec.tables}; the store was rebuilt with other settings than the models were trained on")
    blocks: list[np.ndarray] = []
    if spec.numeric:
        blocks.append(frame.select(pl.col(spec.numeric).cast(pl.Float64)).to_numpy().astype(np.float32))
    if spec.categorical:
        # Looked up value by value (unseen and missing -> NaN): a polars replace over the vocabulary per column
        # per call was a third of a served request's matrix work; 55k rows x 11 columns take ~0.1 s this way.
        codes = np.empty((frame.height, len(spec.categorical)), dtype=np.float32)
        for number, column in enumerate(spec.categorical):
            lookup = spec.codes(column)
            codes[:, number] = [lookup.get(value, np.nan) for value in frame[column].cast(pl.String).to_list()]
        blocks.append(codes)
    for column, dim in spec.arrays.items():
        values = frame[column]
        if values.null_count():
            raise StaleTable(f"{column}: {values.null_count()} rows have no vector; rebuild that table")
        matrix = values.to_numpy().astype(np.float32)
        if matrix.shape != (frame.height, dim):
            raise StaleTable(f"{column}: expected {dim}-dim vectors, got shape {matrix.shape}")
        blocks.append(matrix)
    if not blocks:
        # A purely sparse feature set, or none at all (a learner that reads only the item text): an empty block.
        if spec.sparse or not spec.tables:
            return np.zeros((frame.height, 0), dtype=np.float32)
        raise ConfigError(f"tables {spec.tables} hold no usable feature columns")
    return np.ascontiguousarray(np.hstack(blocks), dtype=np.float32)


def sparse_block(store: FeatureStore, spec: MatrixSpec, ids: np.ndarray) -> sp.csr_matrix | None:
    """The spec's sparse tables in the order of `ids`, hstacked; None when the spec has none."""
    if not spec.sparse:
        return None
    blocks = []
    for table, width in spec.sparse.items():
        if sparse_width(store, table) != width:
            raise StaleTable(f"{table} has {sparse_width(store, table)} columns here but the models were trained on "
                             f"{width}; rebuild with the training store's vocabulary (or retrain)")
        block = read_sparse(store, table, ids)
        blocks.append(block[:, spec.sparse_columns[table]] if table in spec.sparse_columns else block)
    return sp.hstack(blocks, format="csr", dtype=np.float32) if len(blocks) > 1 else blocks[0]


def cap_sparse_columns(spec: MatrixSpec, store: FeatureStore, train_ids: np.ndarray, limit: int) -> None:
    """Keep the `limit` columns of each sparse table present in the most training rows (document frequency: no
    target involved), ties by column index. LightGBM over 100k+ sparse columns is slow for little gain."""
    if limit <= 0:
        return
    for table, width in spec.sparse.items():
        if width <= limit:
            continue
        frequency = np.bincount(read_sparse(store, table, train_ids).indices, minlength=width)
        keep = np.sort(np.lexsort((np.arange(width), -frequency))[:limit])
        spec.sparse_columns[table] = keep.tolist()


def feature_inputs(store: FeatureStore, spec: MatrixSpec, frame: pl.DataFrame) -> Inputs:
    """The learner's Inputs for `frame`'s rows: dense block from the frame, sparse block from the store."""
    return Inputs(transform(spec, frame), sparse_block(store, spec, frame["sample_id"].to_numpy()))


def online_inputs(spec: MatrixSpec, tables: dict[str, pl.DataFrame], shared: dict | None = None) -> Inputs:
    """The learner's Inputs for new rows whose tables are in memory (pipeline.online), in the order of
    `tables["items"]`: the columns `load_frame` + `feature_inputs` give from a store (same names, same spec).

    `shared` (one dict per batch of rows) keeps what the learners of one call have in common: the joined dense
    frame per table set, each sparse table's CSR, and the Inputs themselves per spec (learners fitted on the same
    columns, such as a learner's fold models or two learners on one feature set, get the same object; a learner
    must not change its Inputs in place). A served batch went through the same joins and CSR conversions once per
    learner."""
    shared = {} if shared is None else shared
    key = ("inputs", spec.signature())
    if key in shared:
        return shared[key]
    items = tables[ITEMS]
    dense = tuple(t for t in spec.tables if t not in spec.sparse)
    if ("frame", dense) not in shared:
        parts = [items.select("sample_id")]
        for table in dense:
            part = in_row_order(items, tables[table])
            leaked = [c for c in part.columns if label_column_problem(c)]
            if leaked:
                raise ConfigError(f"table {table} holds {leaked}, the target or the fold plan; a feature table "
                                  "must not")
            # Series renamed one by one: a frame-level rename runs a query per table per learner per request.
            parts.append(pl.DataFrame([part[c].alias(f"{table}.{c}") for c in part.columns if c != "sample_id"]))
        shared["frame", dense] = pl.concat(parts, how="horizontal")
    frame = shared["frame", dense]
    sparse = None
    if spec.sparse:
        blocks = []
        for table, width in spec.sparse.items():
            if ("csr", table, width) not in shared:
                shared["csr", table, width] = frame_to_csr(in_row_order(items, tables[table]), width)
            block = shared["csr", table, width]
            blocks.append(block[:, spec.sparse_columns[table]] if table in spec.sparse_columns else block)
        sparse = sp.hstack(blocks, format="csr", dtype=np.float32) if len(blocks) > 1 else blocks[0]
    text = items["text"].fill_null("").to_numpy().astype(object) if "text" in items.columns else None
    shared[key] = Inputs(transform(spec, frame), sparse, text=text)
    return shared[key]
