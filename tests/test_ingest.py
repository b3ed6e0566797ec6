"""Every validation error class names the file, row and column, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from features.ingest import IngestError, ItemsBuilder, load_items, read_raw
from featurestore.builders import BuildContext, run_builders
from featurestore.config import load_config
from featurestore.store import FeatureStore
from tests.conftest import SHARED, make_config


def _csv(path: Path, rows: list[dict], header: str = "sample_id,catalog_content,image_link,price") -> Path:
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header.split(","))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(real_train: pl.DataFrame, n: int = 5) -> list[dict]:
    return [
        {k: ("" if v is None else v) for k, v in r.items()} for r in real_train.head(n).iter_rows(named=True)
    ]


def _ingest_error(tmp_path: Path, train_path: Path) -> IngestError:
    config = load_config(None, {"data.train": str(train_path), "data.test": "", "store.dir": str(tmp_path / "s")})
    with pytest.raises(IngestError) as info:
        load_items(config)
    return info.value


def test_real_rows_ingest(tmp_path: Path, real_train: pl.DataFrame, real_test: pl.DataFrame) -> None:
    config = make_config(tmp_path, real_train, real_test)
    items = load_items(config)
    assert items.height == real_train.height + real_test.height
    assert items.filter(pl.col("split") == "train")["price"].to_list() == real_train["price"].to_list()
    assert items.filter(pl.col("split") == "test")["price"].null_count() == real_test.height
    assert items["text"].to_list()[: real_train.height] == real_train["catalog_content"].to_list()


def test_csv_and_parquet_give_same_items(tmp_path: Path, real_train: pl.DataFrame) -> None:
    csv_path = _csv(tmp_path / "train.csv", _rows(real_train, 20))
    parquet_path = tmp_path / "train.parquet"
    real_train.head(20).write_parquet(parquet_path)
    a = load_items(load_config(None, {"data.train": str(csv_path), "data.test": ""}))
    b = load_items(load_config(None, {"data.train": str(parquet_path), "data.test": ""}))
    assert a.equals(b)


def test_missing_column(tmp_path: Path, real_train: pl.DataFrame) -> None:
    path = tmp_path / "t.parquet"
    real_train.head(3).drop("price").write_parquet(path)
    err = _ingest_error(tmp_path, path)
    assert err.problems[0].column == "price" and "missing" in str(err)


def test_duplicate_id(tmp_path: Path, real_train: pl.DataFrame) -> None:
    rows = _rows(real_train)
    rows[3]["sample_id"] = rows[1]["sample_id"]
    err = _ingest_error(tmp_path, _csv(tmp_path / "t.csv", rows))
    assert [(p.row, p.column) for p in err.problems] == [(2, "sample_id"), (4, "sample_id")]
    assert "duplicate id" in str(err) and "t.csv" in str(err)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [("nan", "finite"), ("-3.5", "> 0"), ("0", "> 0"), ("abc", "not a number"), ("", "missing"), ("inf", "finite")],
)
def test_bad_price(tmp_path: Path, real_train: pl.DataFrame, bad: str, needle: str) -> None:
    rows = _rows(real_train)
    rows[2]["price"] = bad
    err = _ingest_error(tmp_path, _csv(tmp_path / "t.csv", rows))
    assert len(err.problems) == 1
    problem = err.problems[0]
    assert (problem.row, problem.column) == (3, "price")
    assert needle in problem.message


def test_non_utf8_bytes(tmp_path: Path, real_train: pl.DataFrame) -> None:
    path = _csv(tmp_path / "t.csv", _rows(real_train))
    data = path.read_bytes()
    second_item = real_train["catalog_content"][1][:20].encode()
    path.write_bytes(data.replace(second_item, second_item + b"\xff\xfe", 1))
    err = _ingest_error(tmp_path, path)
    assert [(p.row, p.column) for p in err.problems] == [(2, "catalog_content")]
    assert "UTF-8" in str(err)


def test_empty_text(tmp_path: Path, real_train: pl.DataFrame) -> None:
    rows = _rows(real_train)
    rows[4]["catalog_content"] = "   "
    err = _ingest_error(tmp_path, _csv(tmp_path / "t.csv", rows))
    assert [(p.row, p.column) for p in err.problems] == [(5, "catalog_content")]


def test_one_megabyte_text(tmp_path: Path, real_train: pl.DataFrame) -> None:
    rows = _rows(real_train)
    rows[0]["catalog_content"] = "Item Name: huge\n" + "x" * 1_000_000
    err = _ingest_error(tmp_path, _csv(tmp_path / "t.csv", rows))
    assert [(p.row, p.column) for p in err.problems] == [(1, "catalog_content")]
    assert "max_text_chars" in str(err)


def test_train_test_ids_overlap(tmp_path: Path, real_train: pl.DataFrame, real_test: pl.DataFrame) -> None:
    test = pl.concat([real_test.head(3), real_train.head(1).drop("price")])
    config = make_config(tmp_path, real_train.head(10), test)
    with pytest.raises(IngestError) as info:
        load_items(config)
    assert info.value.problems[0].row == 4 and "disjoint" in str(info.value)


def test_rejected_ingest_writes_nothing(tmp_path: Path, real_train: pl.DataFrame) -> None:
    good = make_config(tmp_path, real_train.head(10), None)
    store = FeatureStore(good.store.dir)
    run_builders(BuildContext(store, good), [ItemsBuilder(good)])
    before = store.read("items")
    bad_train = real_train.head(10).with_columns(price=pl.lit(-1.0))
    bad_train.write_parquet(good.data.train)
    with pytest.raises(IngestError):
        run_builders(BuildContext(store, good), [ItemsBuilder(good)])
    assert store.read("items").equals(before)


def test_non_csv_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(IngestError, match="expected a .csv or .parquet"):
        read_raw(path)


@pytest.mark.skipif(not (SHARED / "mercari").is_dir(), reason="shared Mercari corpus not present")
def test_mercari_loads_through_column_mapping(tmp_path: Path) -> None:
    config = load_config(Path(__file__).parents[1] / "configs" / "mercari.toml", {
        "store.dir": str(tmp_path), "data.train": str(SHARED / "mercari" / "train.parquet"),
        "data.test": str(SHARED / "mercari" / "test_unlabelled.parquet")})
    items = load_items(config)
    train = items.filter(pl.col("split") == "train")
    assert train.height == 54_806
    assert {"cat_brand_name", "cat_category_name", "text_name", "text_item_description"} <= set(items.columns)
    assert train["group_id"].null_count() == 0
    assert items["text"][0].startswith("name: ")


def test_ids_equal_after_conversion_are_duplicates(tmp_path: Path, real_train: pl.DataFrame) -> None:
    """'33127' and '33127.0' are one id once read as numbers: before the fix both became 33127, the joins fanned
    out (stack_oof reached 1,049,206 rows) and stack reported a wrong CV SMAPE with exit 0."""
    rows = _rows(real_train)
    rows[1]["sample_id"], rows[3]["sample_id"] = "999001", "999001.0"
    err = _ingest_error(tmp_path, _csv(tmp_path / "t.csv", rows))
    assert [p.row for p in err.problems] == [2, 4] and "more than once" in str(err)


def test_leading_zero_ids_stay_text(tmp_path: Path, real_train: pl.DataFrame) -> None:
    """'033127' is not 33127: ids with a leading zero keep all ids as text, so they stay distinct."""
    rows = _rows(real_train)
    rows[1]["sample_id"], rows[3]["sample_id"] = "999001", "0999001"
    config = load_config(None, {"data.train": str(_csv(tmp_path / "t.csv", rows)), "data.test": "",
                                "store.dir": str(tmp_path / "s")})
    items = load_items(config)
    assert items["sample_id"].dtype == pl.String and set(items["sample_id"]) >= {"999001", "0999001"}
    assert items["sample_id"].n_unique() == items.height


def test_float_train_ids_and_int_test_ids_overlap_is_caught(tmp_path: Path, real_train: pl.DataFrame,
                                                            real_test: pl.DataFrame) -> None:
    """Float64 train ids vs Int64 test ids used to be compared as '33127.0' vs '33127' and hid the overlap."""
    train = real_train.head(10).with_columns(pl.col("sample_id").cast(pl.Float64))
    test = pl.concat([real_test.head(3), real_train.head(1).drop("price")])
    config = make_config(tmp_path, train, test)
    with pytest.raises(IngestError) as info:
        load_items(config)
    assert info.value.problems[0].row == 4 and "disjoint" in str(info.value)
    clean = make_config(tmp_path / "ok", train, real_test.head(3))
    items = load_items(clean)
    assert items["sample_id"].dtype == pl.Int64 and items.height == 13


def test_header_only_train_file_is_refused(tmp_path: Path) -> None:
    path = _csv(tmp_path / "empty.csv", [])
    err = _ingest_error(tmp_path, path)
    assert "header only" in str(err) and "empty.csv" in str(err)
