"""Units for tests/test_engine.py, in an importable module: Ray workers import a unit's function by its module
path (`tests.engine_units`), which a pytest test module's name is not."""

from __future__ import annotations

from featurestore.errors import InputError
from featurestore.store import FeatureStore


def raise_input_error(shared: object, unit: int, threads: int) -> int:
    if unit == 2:
        raise InputError(f"unit {unit}: a message written for the user")
    return unit * 10


def open_store(root: str, unit: int, threads: int) -> int:
    with FeatureStore(root).connect() as con:
        return int(con.execute("SELECT 1").fetchone()[0])
