"""Ingest: read the raw train/test files through the column mapping, validate every row, build `items`.

Validation is all-or-nothing: every problem found is reported (file, row, column, what was expected) and
nothing is written, so a bad file never leaves a half-ingested store behind.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from featurestore.builders import BuildContext, Built, FeatureBuilder, OnlineRows
from featurestore.config import ColumnsConfig, Config, ValidationConfig
from featurestore.errors import UserError
from featurestore.store import FeatureStore, file_sha256

MAX_REPORTED_PROBLEMS = 25


@dataclass(frozen=True)
class Problem:
    file: str
    row: int | None  # 1-based data row (the header is not counted); None for file-level problems
    column: str | None
    message: str

    def __str__(self) -> str:
        where = [self.file]
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column '{self.column}'")
        return f"{', '.join(where)}: {self.message}"


class IngestError(UserError, ValueError):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        shown = "\n  ".join(str(p) for p in problems[:MAX_REPORTED_PROBLEMS])
        more = len(problems) - MAX_REPORTED_PROBLEMS
        suffix = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(problems)} problem(s) in the input; nothing was written:\n  {shown}{suffix}")


def _first_rows(mask: pl.Series, limit: int = MAX_REPORTED_PROBLEMS) -> list[int]:
    """0-based indices where mask is true (first few only)."""
    return mask.arg_true().head(limit).to_list()


def read_raw(path: Path) -> pl.DataFrame:
    """Read CSV (every column as text, so bad values can be reported, not coerced) or Parquet."""
    name = str(path)
    if not path.is_file():
        raise IngestError([Problem(name, None, None, "file not found")])
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise IngestError([Problem(name, None, None, "file is empty; expected a header line and rows")])
    if suffix in {".parquet", ".pq"}:
        try:
            return pl.read_parquet(path)
        except (pl.exceptions.PolarsError, OSError) as exc:
            reason = str(exc).splitlines()[0]
            raise IngestError([Problem(name, None, None, f"not a readable Parquet file ({reason}); "
                                                         "re-export it, or give a CSV")]) from exc
    if suffix not in {".csv", ".tsv", ".txt"}:
        raise IngestError([Problem(name, None, None, f"expected a .csv or .parquet file, got '{suffix}'")])
    raw = path.read_bytes()
    separator = "\t" if suffix == ".tsv" else ","
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Re-read lossily only to locate the offending rows: invalid bytes become U+FFFD.
        lossy = pl.read_csv(raw, infer_schema=False, encoding="utf8-lossy", separator=separator)
        problems = []
        for column in lossy.columns:
            for row in _first_rows(lossy[column].str.contains("\ufffd", literal=True).fill_null(False)):
                problems.append(Problem(name, row + 1, column, "bytes are not valid UTF-8; expected UTF-8 text"))
        if not problems:
            problems.append(Problem(name, None, None, f"not valid UTF-8 at byte {exc.start}; expected UTF-8"))
        raise IngestError(problems) from exc
    # polars pads a short row with nulls (a truncated test row was priced from half its fields) and names no row
    # when one is long: every row's field count is checked first, by data row (quoted newlines included).
    structure = _csv_structure_problems(name, text, separator)
    if structure:
        raise IngestError(structure)
    try:
        return pl.read_csv(raw, infer_schema=False, separator=separator)
    except pl.exceptions.ComputeError as exc:
        raise IngestError([Problem(name, None, None, f"not a readable CSV: {str(exc).splitlines()[0]}")]) from exc


def _csv_structure_problems(name: str, text: str, separator: str) -> list[Problem]:
    """Rows whose field count differs from the header's, numbered as data rows (the header is not counted; a
    quoted newline inside a field does not start a row). The stdlib reader follows polars' quoting rules."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # texts may be far longer than the 128 KiB default
    reader = csv.reader(io.StringIO(text), delimiter=separator)
    problems: list[Problem] = []
    row_number = 0
    try:
        header = next(reader, None)
        if header is None:
            return []
        for row_number, row in enumerate(reader, start=1):
            if row and len(row) != len(header):
                problems.append(Problem(name, row_number, None, f"has {len(row)} fields but the header has "
                                        f"{len(header)} (an unquoted '{separator}', a stray quote or a cut row?)"))
                if len(problems) >= MAX_REPORTED_PROBLEMS:
                    break
    except csv.Error as err:
        problems.append(Problem(name, row_number + 1, None, f"not a readable CSV row: {err}"))
    return problems


def _check_columns(df: pl.DataFrame, name: str, cols: ColumnsConfig, labelled: bool) -> list[Problem]:
    required = [cols.id, *cols.text, *cols.categorical, *cols.numeric]
    if cols.image:
        required.append(cols.image)
    if cols.group and labelled:
        required.append(cols.group)
    if labelled:
        required.append(cols.target)
    missing = [c for c in dict.fromkeys(required) if c not in df.columns]
    return [
        Problem(name, None, c, f"required column is missing (file has: {', '.join(df.columns)})") for c in missing
    ]


def _validate_ids(df: pl.DataFrame, name: str, id_col: str) -> list[Problem]:
    problems = []
    ids = df[id_col]
    if ids.dtype == pl.String:
        ids = ids.str.strip_chars()
        empty = ids.is_null() | (ids == "")
    else:
        empty = ids.is_null()
    for row in _first_rows(empty):
        problems.append(Problem(name, row + 1, id_col, "id is empty; expected a unique non-null id"))
    duplicated = ids.is_duplicated() & ~empty
    for row in _first_rows(duplicated):
        problems.append(Problem(name, row + 1, id_col, f"duplicate id {ids[row]!r}; expected unique ids"))
    return problems


def _parse_price(df: pl.DataFrame, name: str, target: str, vcfg: ValidationConfig
                 ) -> tuple[pl.Series, list[Problem]]:
    raw = df[target]
    problems = []
    if raw.dtype == pl.String:
        text = raw.str.strip_chars()
        price = text.cast(pl.Float64, strict=False)
        for row in _first_rows(price.is_null() & text.is_not_null() & (text != "")):
            problems.append(Problem(name, row + 1, target, f"{raw[row]!r} is not a number; expected a price > 0"))
        missing = text.is_null() | (text == "")
    elif raw.dtype.is_numeric():
        price = raw.cast(pl.Float64)
        missing = price.is_null()
    else:
        return raw, [Problem(name, None, target, f"column has type {raw.dtype}; expected numbers")]
    for row in _first_rows(missing):
        problems.append(Problem(name, row + 1, target, "price is missing; expected a price > 0"))
    bad = price.is_nan() | price.is_infinite() | (price <= 0)
    for row in _first_rows(bad.fill_null(False)):
        problems.append(Problem(name, row + 1, target, f"price {price[row]} is invalid; expected finite and > 0"))
    extreme = ~bad & ((price < vcfg.min_target) | (price > vcfg.max_target))
    for row in _first_rows(extreme.fill_null(False)):
        problems.append(Problem(name, row + 1, target, f"price {price[row]!r} is outside [{vcfg.min_target:g}, "
                                f"{vcfg.max_target:g}] (validation.min_target / max_target); fix the value or "
                                "widen the range"))
    return price, problems


def _text_columns(df: pl.DataFrame, name: str, cols: ColumnsConfig, vcfg: ValidationConfig) -> list[Problem]:
    problems = []
    for column in cols.text:
        if df[column].dtype != pl.String:
            problems.append(Problem(name, None, column, f"column has type {df[column].dtype}; expected text"))
            continue
        lengths = df[column].str.len_chars()
        for row in _first_rows((lengths > vcfg.max_text_chars).fill_null(False)):
            problems.append(
                Problem(
                    name,
                    row + 1,
                    column,
                    f"text is {lengths[row]:,} characters; expected at most {vcfg.max_text_chars:,} "
                    "(validation.max_text_chars)",
                )
            )
    if problems:
        return problems
    non_empty = pl.any_horizontal(
        [pl.col(c).str.strip_chars().str.len_chars().fill_null(0) > 0 for c in cols.text]
    )
    empty = ~df.select(non_empty).to_series()
    for row in _first_rows(empty):
        problems.append(Problem(name, row + 1, "/".join(cols.text), "text is empty; expected non-empty text"))
    return problems


def _combined_text(cols: ColumnsConfig) -> pl.Expr:
    if len(cols.text) == 1:
        return pl.col(cols.text[0]).fill_null("")
    # Several text columns (Mercari: name + description) become one labelled multi-line text.
    parts = [pl.format(f"{c}: {{}}", pl.col(c).fill_null("")) for c in cols.text]
    return pl.concat_str(parts, separator="\n")


def normalise(df: pl.DataFrame, name: str, split: str, cols: ColumnsConfig, vcfg: ValidationConfig) -> pl.DataFrame:
    """Validate one file and map it onto the `items` schema. Raises IngestError listing every problem."""
    labelled = split == "train"
    problems = _check_columns(df, name, cols, labelled)
    if problems:
        raise IngestError(problems)
    problems += _validate_ids(df, name, cols.id)
    problems += _text_columns(df, name, cols, vcfg)
    price = pl.Series("price", [None] * df.height, dtype=pl.Float64)
    if labelled:
        price, price_problems = _parse_price(df, name, cols.target, vcfg)
        problems += price_problems
    numeric_exprs = []
    for column in cols.numeric:
        values = df[column].cast(pl.Float64, strict=False) if df[column].dtype == pl.String else df[column]
        if not values.dtype.is_numeric():
            problems.append(Problem(name, None, column, f"column has type {values.dtype}; expected numbers"))
            continue
        for row in _first_rows(values.is_null() & df[column].is_not_null()):
            problems.append(Problem(name, row + 1, column, f"{df[column][row]!r} is not a number"))
        numeric_exprs.append(values.cast(pl.Float64).alias(f"num_{column}"))
    if problems:
        raise IngestError(problems)

    out = df.select(
        df[cols.id].alias("sample_id"),
        pl.lit(split).alias("split"),
        _combined_text(cols).alias("text"),
        (pl.col(cols.image) if cols.image else pl.lit(None, dtype=pl.String)).cast(pl.String).alias("image_link"),
        price.alias("price"),
        (pl.col(cols.group).cast(pl.String) if cols.group and labelled else pl.lit(None, dtype=pl.String)).alias(
            "group_id"
        ),
        *[pl.col(c).cast(pl.String).alias(f"text_{c}") for c in cols.text if len(cols.text) > 1],
        *[pl.col(c).cast(pl.String).alias(f"cat_{c}") for c in cols.categorical],
        *numeric_exprs,
    )
    return out


INTEGER_TEXT = r"^-?\d+(\.0+)?$"  # "33127" or "33127.0" (a float column exported as text)


def _integer_rows(ids: pl.Series) -> pl.Series:
    """Per id: a whole number that survives a round trip through an integer (an integer, an integral float, or a
    digit string without a leading zero: "033127" is text, its zero would be lost)."""
    if ids.dtype.is_integer():
        return pl.Series([True] * ids.len(), dtype=pl.Boolean)
    if ids.dtype.is_float():
        return (ids % 1 == 0) & ids.is_finite() & (ids.abs() < 2**53)
    if ids.dtype == pl.String:
        text = ids.str.strip_chars()
        return text.str.contains(INTEGER_TEXT) & ~text.str.contains(r"^-?0\d") & (text.str.len_chars() < 19)
    return pl.Series([False] * ids.len(), dtype=pl.Boolean)


def _integer_like(ids: pl.Series) -> bool:
    """Whether every id is a whole number (see `_integer_rows`)."""
    return bool(_integer_rows(ids).all())


def canonical_ids(frames: list[tuple[str, pl.DataFrame]], id_col: str, id_type: pl.DataType | None = None
                  ) -> list[pl.DataFrame]:
    """One id type for train and test, decided from the files' own values: Int64 when every id of every file is a
    whole number (33127, 33127.0, "33127"), else text (integers written without a fraction). Duplicates and
    train/test overlap are then checked on the canonical ids, so "33127" and "33127.0" cannot both pass.

    `id_type` (a store derived for `predict`: the training store's id type) fixes the type instead: new rows are
    cast to it, so one text id among them cannot turn every training id into text and redraw the folds (sorted
    by id); an id that does not fit an integer store is refused, named."""
    if id_type is not None and id_type.is_integer():
        for name, frame in frames:
            ids = frame["sample_id"]
            if _integer_like(ids):
                continue
            bad = ~_integer_rows(ids)
            raise IngestError([Problem(name, row + 1, id_col, f"id {ids[row]!r} is not a whole number, but the "
                                       "training store's ids are integers; give new rows integer ids (no leading "
                                       "zeros, no fraction)") for row in _first_rows(bad.fill_null(True))])
    as_int = (id_type.is_integer() if id_type is not None
              else all(_integer_like(f["sample_id"]) for _, f in frames))
    out = []
    for name, frame in frames:
        ids = frame["sample_id"]
        if ids.dtype == pl.String:
            ids = ids.str.strip_chars()
        if as_int:
            ids = ids.str.replace(r"\.0+$", "") if ids.dtype == pl.String else ids
            ids = ids.cast(pl.Int64)
        elif ids.dtype.is_float():
            ids = pl.Series([str(int(v)) if v == int(v) else repr(v) for v in ids.to_list()], dtype=pl.String)
        else:
            ids = ids.cast(pl.String)
        frame = frame.with_columns(ids.alias("sample_id"))
        duplicated = frame["sample_id"].is_duplicated()
        if duplicated.any():
            raw = frame["sample_id"]
            raise IngestError([Problem(name, row + 1, id_col, f"id {raw[row]!r} appears more than once when ids are "
                                       "read as one type (e.g. '33127' and '33127.0'); expected unique ids")
                               for row in _first_rows(duplicated)])
        out.append(frame)
    return out


def load_items(config: Config, id_type: pl.DataType | None = None) -> pl.DataFrame:
    cols, vcfg = config.columns, config.validation
    named = []
    for split, path_str in (("train", config.data.train), ("test", config.data.test)):
        if not path_str:
            if split == "train":
                raise IngestError([Problem("data.train", None, None, "no training file configured")])
            continue
        path = Path(path_str)
        frame = normalise(read_raw(path), str(path), split, cols, vcfg)
        if split == "train" and frame.height == 0:
            raise IngestError([Problem(str(path), None, None, "no rows (header only); expected labelled rows")])
        named.append((str(path), frame))
    frames = canonical_ids(named, cols.id, id_type)
    if len(frames) == 2:
        refuse_training_ids(frames[1], frozenset(frames[0]["sample_id"].to_list()), config.data.test, cols.id)
    return pl.concat(frames, how="diagonal_relaxed")


def refuse_training_ids(new: pl.DataFrame, train_ids: frozenset, source: str, id_col: str) -> None:
    """New (test) rows must not reuse a training id: their features would be looked up as the training row's.
    A set lookup per new row (online pricing makes the set once; a join with every training id was half of a
    served request's ingest)."""
    reused = [(row, value) for row, value in enumerate(new["sample_id"].to_list()) if value in train_ids]
    if reused:
        raise IngestError([Problem(source, row + 1, id_col, f"id {value!r} also in the train file; expected train "
                                   "and test ids to be disjoint") for row, value in reused[:MAX_REPORTED_PROBLEMS]])


class ItemsBuilder(FeatureBuilder):
    table = "items"
    version = "2"
    reads = ("columns", "validation", "data.train", "data.test")

    def external_fingerprint(self) -> str:
        hashes = []
        for path_str in (self.config.data.train, self.config.data.test):
            path = Path(path_str) if path_str else None
            hashes.append(file_sha256(path) if path is not None and path.is_file() else "missing")
        return ":".join(hashes)

    def build(self, ctx: BuildContext) -> Built:
        return Built(load_items(self.config))

    supports_online = True

    def online_state(self, trained: FeatureStore, threads: int) -> Any:
        ids = trained.read("items", columns=["sample_id", "split"])
        return (trained.read_schema("items")["sample_id"],
                frozenset(ids.filter(pl.col("split") == "train")["sample_id"].to_list()))

    def online(self, state: Any, rows: OnlineRows) -> pl.DataFrame:
        """The new rows as test rows of the training store: validated like a test file, ids cast to the store's
        id type, training ids refused."""
        id_type, train_ids = state
        cols = self.config.columns
        (frame,) = canonical_ids([(rows.source, normalise(rows.raw, rows.source, "test", cols,
                                                          self.config.validation))], cols.id, id_type)
        refuse_training_ids(frame, train_ids, rows.source, cols.id)
        return frame
