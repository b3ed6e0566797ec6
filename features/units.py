"""Unit spellings -> canonical unit, kind and factor to base units (grams, millilitres, count).

The real rows spell one unit many ways (Ounce/ounce/oz/OZ, Fl Oz/FL Oz/Fluid Ounce, Count/count/ct, None,
`Value: nan`). Spellings are folded (lower case, dots removed, spaces squeezed) before the lookup.
"""

from __future__ import annotations

import polars as pl

# canonical name -> (kind, factor to the base unit of that kind)
CANONICAL: dict[str, tuple[str, float]] = {
    "g": ("mass", 1.0),
    "kg": ("mass", 1000.0),
    "mg": ("mass", 0.001),
    "oz": ("mass", 28.349523125),
    "lb": ("mass", 453.59237),
    "ml": ("volume", 1.0),
    "l": ("volume", 1000.0),
    "fl_oz": ("volume", 29.5735295625),
    "gallon": ("volume", 3785.411784),
    "quart": ("volume", 946.352946),
    "pint": ("volume", 473.176473),
    "cup": ("volume", 236.5882365),
    "count": ("count", 1.0),
    "sq_ft": ("area", 1.0),
    "ft": ("length", 304.8),
    "in": ("length", 25.4),
    "cm": ("length", 10.0),
    "mm": ("length", 1.0),
    "m": ("length", 1000.0),
}

# folded spelling -> canonical name
SPELLINGS: dict[str, str] = {
    **dict.fromkeys(["g", "gr", "gram", "grams", "gm", "gms", "grams(g)"], "g"),
    **dict.fromkeys(["kg", "kgs", "kilogram", "kilograms", "kilo"], "kg"),
    **dict.fromkeys(["mg", "milligram", "milligrams"], "mg"),
    **dict.fromkeys(["oz", "ounce", "ounces", "onza", "0z", "oz wt", "net wt oz"], "oz"),
    **dict.fromkeys(["lb", "lbs", "pound", "pounds"], "lb"),
    **dict.fromkeys(["ml", "milliliter", "milliliters", "millilitre", "millilitres", "mls"], "ml"),
    **dict.fromkeys(["l", "liter", "liters", "litre", "litres", "ltr"], "l"),
    **dict.fromkeys(
        ["fl oz", "floz", "fl ounce", "fluid ounce", "fluid ounces", "fl ounces", "fl oz.", "fl. oz", "fl"],
        "fl_oz",
    ),
    **dict.fromkeys(["gallon", "gallons", "gal"], "gallon"),
    **dict.fromkeys(["quart", "quarts", "qt"], "quart"),
    **dict.fromkeys(["pint", "pints", "pt"], "pint"),
    **dict.fromkeys(["cup", "cups"], "cup"),
    **dict.fromkeys(
        [
            "count", "ct", "each", "ea", "piece", "pieces", "pc", "pcs", "unit", "units", "pack", "packs", "jar",
            "bottle", "bottles", "bag", "bags", "box", "boxes", "can", "cans", "packet", "packets", "pouch",
            "tea bags", "capsule", "capsules", "tablet", "tablets", "sheet", "sheets", "roll", "rolls", "pair",
            "carton", "case", "k-cup", "k-cups", "pod", "pods", "bar", "bars", "stick", "sticks",
        ],
        "count",
    ),
    **dict.fromkeys(["sq ft", "square feet", "square foot", "sqft"], "sq_ft"),
    **dict.fromkeys(["foot", "feet", "ft"], "ft"),
    **dict.fromkeys(["inch", "inches", "in"], "in"),
    **dict.fromkeys(["cm", "centimeter", "centimeters", "centimetre", "centimetres"], "cm"),
    **dict.fromkeys(["mm", "millimeter", "millimeters", "millimetre", "millimetres"], "mm"),
    **dict.fromkeys(["meter", "meters", "metre", "metres", "m"], "m"),
}

MISSING_SPELLINGS = {"", "none", "nan", "null", "n/a", "na"}


def fold_spelling(expr: pl.Expr) -> pl.Expr:
    """Lower case, drop dots, squeeze whitespace: 'Fl. Oz' -> 'fl oz'."""
    return (
        expr.str.to_lowercase()
        .str.replace_all(r"\.", " ")
        .str.replace_all(r"\s+", " ")
        .str.strip_chars()
    )


def canonical_unit(raw: pl.Expr) -> pl.Expr:
    """Canonical unit name; null for missing spellings; 'other' for spellings not in the table."""
    folded = fold_spelling(raw)
    return (
        pl.when(folded.is_null() | folded.is_in(list(MISSING_SPELLINGS)))
        .then(pl.lit(None, dtype=pl.String))
        .otherwise(folded.replace_strict(SPELLINGS, default="other", return_dtype=pl.String))
    )


def unit_kind(canonical: pl.Expr) -> pl.Expr:
    kinds = {name: kind for name, (kind, _) in CANONICAL.items()}
    return canonical.replace_strict(kinds, default=None, return_dtype=pl.String)


def unit_factor(canonical: pl.Expr) -> pl.Expr:
    factors = {name: factor for name, (_, factor) in CANONICAL.items()}
    return canonical.replace_strict(factors, default=None, return_dtype=pl.Float64)
