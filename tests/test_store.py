"""Incremental rebuilds, atomic writes, the manifest, folds and the DuckDB views."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import duckdb
import polars as pl
import pytest

from featurestore.builders import BuildContext, run_builders
from featurestore.config import Config, edited
from featurestore.errors import StaleTable
from featurestore.store import FeatureStore
from pipeline.registry import builders_for
from tests.conftest import ROOT, kill9, start_until


def _build(config: Config, store: FeatureStore) -> dict[str, str]:
    results = run_builders(BuildContext(store, config, progress=False), builders_for(config))
    return {r.table: r.status for r in results}


def test_unchanged_inputs_reuse_changed_inputs_rebuild(small_config: Config, store: FeatureStore,
                                                       real_train: pl.DataFrame) -> None:
    assert _build(small_config, store) == {"items": "built", "folds": "built", "catalog": "built"}
    first = store.info("catalog")
    assert _build(small_config, store) == {"items": "reused", "folds": "reused", "catalog": "reused"}
    assert store.info("catalog").created_at == first.created_at

    # A changed input file rebuilds everything downstream of it.
    real_train.head(41).write_parquet(small_config.data.train)
    assert _build(small_config, store) == {"items": "built", "folds": "built", "catalog": "built"}
    assert store.read("items").height == 41 + 10

    # A changed parameter rebuilds only the table it belongs to.
    reseeded = edited(small_config, {"folds.seed": 7})
    assert _build(reseeded, store) == {"items": "reused", "folds": "built", "catalog": "reused"}


def test_manifest_records_build(small_config: Config, store: FeatureStore) -> None:
    _build(small_config, store)
    manifest = store.manifest()
    assert set(manifest["table_name"]) == {"items", "folds", "catalog"}
    row = manifest.filter(pl.col("table_name") == "folds").row(0, named=True)
    assert row["builder"] == "FoldsBuilder" and row["row_count"] == 40
    assert '"k": 4' in row["params"] and "scikit-learn" in row["versions"]
    assert row["seconds"] >= 0 and row["fingerprint"]


def test_views_open_in_plain_duckdb(small_config: Config, store: FeatureStore) -> None:
    _build(small_config, store)
    con = duckdb.connect(str(store.db_path), read_only=True)
    try:
        n = con.execute("SELECT count(*) FROM catalog JOIN items USING (sample_id)").fetchone()[0]
        units = con.execute("SELECT unit, count(*) FROM catalog GROUP BY 1").fetchall()
    finally:
        con.close()
    assert n == 50 and sum(c for _, c in units) == 50


def test_folds_deterministic_stratified_and_order_free(small_config: Config, store: FeatureStore,
                                                       real_train: pl.DataFrame) -> None:
    _build(small_config, store)
    folds = store.read("folds")
    assert folds["fold"].n_unique() == 4 and folds.height == 40
    sizes = folds.group_by("fold").len()["len"]
    assert sizes.max() - sizes.min() <= 1
    # The same rows in another order get the same folds.
    real_train.head(40).reverse().write_parquet(small_config.data.train)
    _build(small_config, store)
    assert store.read("folds").sort("sample_id").equals(folds.sort("sample_id"))


def test_groups_never_straddle_folds(tmp_path: Path, real_train: pl.DataFrame) -> None:
    from tests.conftest import make_config

    train = real_train.head(60).with_columns(seller=(pl.int_range(60) % 13).cast(pl.String))
    config = make_config(tmp_path, train, None, **{"columns.group": "seller", "catalog.use_spacy": False,
                                                   "builders": ["items", "folds"]})
    store = FeatureStore(config.store.dir)
    _build(config, store)
    joined = store.read("folds").join(store.read("items"), on="sample_id")
    assert joined.group_by("group_id").agg(pl.col("fold").n_unique())["fold"].max() == 1


def test_failed_write_keeps_previous_table(small_config: Config, store: FeatureStore,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _build(small_config, store)
    before = store.read("catalog")
    info_before = store.info("catalog")

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("featurestore.store.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.write("catalog", before.head(3), builder="x", params={}, fingerprint="new", seconds=0.0)
    assert store.read("catalog").equals(before)
    assert store.info("catalog").fingerprint == info_before.fingerprint
    assert not [p for p in store.tables_dir.iterdir() if p.name.startswith(".")]


def test_killed_build_leaves_previous_table_intact(small_config: Config, store: FeatureStore) -> None:
    """SIGKILL a real build process after it wrote the temp file but before the rename."""
    _build(small_config, store)
    before = store.read("catalog")
    marker = Path(small_config.store.dir) / "reached_rename"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import featurestore.store as fs
        from featurestore.config import load_config
        from featurestore.builders import BuildContext, run_builders
        from pipeline.registry import builders_for

        def stall(src, dst):
            open({str(marker)!r}, "w").close()
            time.sleep(60)

        fs.os.replace = stall
        config = load_config(None, {{"data.train": {small_config.data.train!r}, "data.test": {small_config.data.test!r},
                                    "store.dir": {small_config.store.dir!r}, "catalog.use_spacy": False,
                                    "folds.k": 4, "folds.price_bands": 4}})
        store = fs.FeatureStore(config.store.dir)
        run_builders(BuildContext(store, config, progress=False), builders_for(config, ["catalog"]), force=True)
        """
    )
    kill9(start_until([sys.executable, "-c", script], marker, timeout=60))
    assert store.read("catalog").equals(before)
    assert _build(small_config, store)["catalog"] == "reused"


def test_a_table_with_repeated_sample_ids_is_refused_at_write_and_at_the_join(small_config: Config,
                                                                              store: FeatureStore) -> None:
    """A feature table with a repeated sample_id must not silently duplicate items in a learner's matrix: the write
    refuses it, and the join refuses a file that holds one anyway (written outside `FeatureStore.write`)."""
    from featurestore.store import atomic_write_parquet
    from models.matrix import load_frame

    run_builders(BuildContext(store, small_config, progress=False), builders_for(small_config))
    catalog = store.read("catalog")
    doubled = pl.concat([catalog, catalog.head(3)])
    info = store.info("catalog")
    with pytest.raises(ValueError, match="repeated sample_ids"):
        store.write("catalog", doubled, builder="test", params=info.params, fingerprint=info.fingerprint, seconds=0.0)
    atomic_write_parquet(doubled, store.table_path("catalog"))
    with store.connect(read_only=False) as con:  # a store whose manifest predates file hashes: nothing to check
        con.execute("UPDATE manifest SET file_sha256 = NULL WHERE table_name = 'catalog'")
    with pytest.raises(StaleTable, match='joining "catalog" onto items gave 53 rows.*repeated sample_ids'):
        load_frame(store, ["catalog"])


def test_code_fingerprints_ignore_comments_and_docstrings(tmp_path: Path) -> None:
    """Editing a comment re-embedded every text and retrained every learner; now only code changes count."""
    import importlib.util

    from featurestore.fingerprint import code_hash

    def module(name: str, source: str) -> object:
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        return loaded

    base = code_hash((module("a", '"""Doc."""\n\ndef f(x):\n    return x + 1\n'),))
    commented = code_hash((module("b", '"""Other doc."""\n# why\n\ndef f(x):  # note\n    """Adds."""\n'
                                       '    return x + 1\n'),))
    changed = code_hash((module("c", '"""Doc."""\n\ndef f(x):\n    return x + 2\n'),))
    assert base == commented
    assert base != changed
