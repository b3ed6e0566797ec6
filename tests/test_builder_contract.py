"""The contract every registered feature builder meets (the builders' `verify_learner`), run over the registry:

- same fingerprint -> the same table, bit for bit (a rebuild on the same inputs changes nothing);
- the tables it reads are exactly its declared `inputs` (so its fingerprint covers everything it depends on);
- out of fold: a builder that reads prices and the fold plan gives fold k's rows values that do not move when
  fold k's prices are permuted.

On a small real store (40 + 10 rows) built with every builder the default config runs (MiniLM for text)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from featurestore.builders import BuildContext, FeatureBuilder, fingerprint_inputs, run_builders
from featurestore.config import Config, KnnConfig, load_config
from featurestore.store import FeatureStore
from pipeline.registry import REGISTRY, builders_for
from tests.conftest import make_config


class RecordingStore(FeatureStore):
    """The store, noting every table a builder reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, create=False)
        self.read_tables: set[str] = set()

    def read(self, name: str, columns: list[str] | None = None) -> pl.DataFrame:
        self.read_tables.add(name)
        return super().read(name, columns)


# Every registered builder (plug-ins included: tests/toy_builder.py registers one), MiniLM for text.
SETTINGS = {"catalog.use_spacy": False, "text_embeddings.models": ["minilm"], "builders": list(REGISTRY),
            "knn.spaces": [s for s in KnnConfig().spaces if "mpnet" not in s]}


def _config(tmp_path: Path, train: pl.DataFrame, test: pl.DataFrame) -> Config:
    return make_config(tmp_path, train, test, **{**SETTINGS, "folds.k": 4, "folds.price_bands": 4})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, FeatureStore]:
    from tests.conftest import SAMPLE

    tmp = tmp_path_factory.mktemp("contract")
    config = _config(tmp, pl.read_parquet(SAMPLE / "train.parquet").head(40),
                     pl.read_parquet(SAMPLE / "test.parquet").head(10))
    store = FeatureStore(config.store.dir)
    run_builders(BuildContext(store, config, progress=False), builders_for(config))
    return config, store


def _builders(config: Config) -> list[FeatureBuilder]:
    return builders_for(config)


def _table_names() -> list[str]:
    """Every table the registry's builders write under the contract's settings, known at collection: a new
    builder (or a builder that writes several tables) is covered without anyone listing it."""
    return [b.table for b in builders_for(load_config(None, SETTINGS))]


TABLES = _table_names()


def _builder(config: Config, table: str) -> FeatureBuilder:
    return {b.table: b for b in _builders(config)}[table]


def test_every_registered_builder_is_covered(built) -> None:
    config, _ = built
    assert set(config.builders) == set(REGISTRY)
    built_in = {n for n, f in REGISTRY.items() if not getattr(f, "builder_class", type).__module__.startswith("tests")}
    assert set(Config().builders) == built_in  # the default config runs every built-in builder
    assert len(_builders(config)) >= 11 and "toy_len" in TABLES


@pytest.mark.parametrize("table", TABLES)
def test_a_builder_sees_only_what_its_fingerprint_covers(built, table: str) -> None:
    """Its config is a view of its `reads`; every `not_fingerprinted` entry is something it reads; and its params
    hash every other declared value (fingerprint coverage by construction, not by a hand-kept params())."""
    config, _ = built
    builder = _builder(config, table)
    for entry in builder.not_fingerprinted:
        section, _, key = entry.partition(".")
        assert entry in builder.reads or section in builder.reads, f"{table}: {entry} is not read"
    params = builder.params()
    for read in builder.reads:
        assert read in params or read in builder.not_fingerprinted, f"{table}: {read} missing from params"
    with pytest.raises(AttributeError, match=r"reads config.stacking without declaring it; add 'stacking'"):
        builder.config.stacking  # noqa: B018  the control: an undeclared section is refused


def test_an_undeclared_key_is_refused_and_a_declared_one_reaches_the_fingerprint(built) -> None:
    config, store = built
    folds = _builder(config, "folds")
    with pytest.raises(AttributeError, match=r"config.columns.id without declaring it; add 'columns.id'"):
        folds.config.columns.id  # noqa: B018  FoldsBuilder declares columns.group only
    before = fingerprint_inputs(folds, store)
    moved = _builder(replace(config, folds=replace(config.folds, price_bands=3)), "folds")
    assert fingerprint_inputs(moved, store)["params"] != before["params"]


@pytest.mark.parametrize("table", TABLES)
def test_builder_contract(built, table: str) -> None:
    config, store = built
    builder = _builder(config, table)
    recording = RecordingStore(store.root)
    fingerprint = store.info(builder.table).fingerprint
    rebuilt = builder.build(BuildContext(recording, config, progress=False, fingerprint=fingerprint)).table
    assert rebuilt.equals(store.read(builder.table)), f"{builder.table}: a rebuild on the same inputs differs"
    read = recording.read_tables - {builder.table}  # embeddings look at their own table for reusable rows
    assert read == set(builder.inputs), f"{builder.table}: reads {sorted(read)}, declares {sorted(builder.inputs)}"
    assert fingerprint_inputs(builder, store)["upstream"].keys() == set(builder.inputs)


def _permute_fold_prices(store: FeatureStore, fold: int) -> None:
    items = store.read("items")
    folds = store.read("folds")
    rows = items.join(folds, on="sample_id", how="left")["fold"].fill_null(-1).to_numpy() == fold
    price = items["price"].to_numpy().copy()
    price[rows] = np.random.default_rng(0).permutation(price[rows])[::-1] * 1.7
    info = store.info("items")
    store.write("items", items.with_columns(pl.Series("price", price)), builder=info.builder, params=info.params,
                fingerprint=info.fingerprint, seconds=0.0)


@pytest.mark.parametrize("table", [t for t in TABLES if t not in ("items", "folds")])
def test_out_of_fold_builders_ignore_their_folds_prices(built, tmp_path: Path, table: str) -> None:
    config, store = built
    builder = _builder(config, table)
    if "folds" not in builder.inputs:
        pytest.skip("reads no prices through the fold plan")
    copy_root = tmp_path / "copy"
    import shutil

    shutil.copytree(store.root, copy_root)
    copied = FeatureStore(copy_root)
    _permute_fold_prices(copied, 0)
    before = store.read(builder.table)
    after = builder.build(BuildContext(copied, replace(config, store=replace(config.store, dir=str(copy_root))),
                                       progress=False, fingerprint="permuted")).table
    fold0 = store.read("folds").filter(pl.col("fold") == 0).select("sample_id")
    columns = [c for c in before.columns if c != "sample_id"]
    kept = before.join(fold0, on="sample_id").sort("sample_id")
    moved = after.join(fold0, on="sample_id").sort("sample_id")
    assert kept.select(columns).equals(moved.select(columns)), f"{builder.table}: fold 0 moved with its own prices"
    others = before.join(fold0, on="sample_id", how="anti").sort("sample_id")
    changed = after.join(fold0, on="sample_id", how="anti").sort("sample_id")
    assert not others.select(columns).equals(changed.select(columns)), \
        f"{builder.table}: the control failed: other folds' rows should see fold 0's new prices"


def _online(builder: FeatureBuilder, state: object, store: FeatureStore, ids: list) -> pl.DataFrame:
    """The builder's online rows for `ids` (test rows of the store), its inputs being the stored tables' rows
    (so each builder's online logic is checked on its own, not through its upstream's)."""
    from featurestore.builders import OnlineRows
    from tests.conftest import SAMPLE

    tables = {t: store.read(t).filter(pl.col("sample_id").is_in(ids)) for t in builder.inputs}
    raw = pl.read_parquet(SAMPLE / "test.parquet").filter(pl.col("sample_id").is_in(ids))
    if "items" in tables:
        tables["items"] = pl.DataFrame({"sample_id": raw["sample_id"]}).join(tables["items"], on="sample_id",
                                                                             how="left", maintain_order="left")
    return builder.online(state, OnlineRows(raw, "test", tables)).sort("sample_id")


@pytest.mark.parametrize("table", TABLES)
def test_online_rows_are_what_build_gives_a_test_row_whatever_their_batch_mates(built, table: str) -> None:
    """New rows (pipeline.online: `predict`, `serve`) get what `build` gave the store's own test rows, from the
    same inputs: exactly, except encoder vectors (the store encoded its test rows in batches, new rows go one at a
    time; with int8 ONNX MiniLM that moved them to cosine 0.989-0.996 here: > 0.98 is required). A row's values
    do not depend on the rows sent with it: three test rows alone equal the same rows sent with the other seven,
    bit for bit. Built-in builders must have an online path."""
    config, store = built
    builder = _builder(config, table)
    if not builder.supports_online:
        assert type(builder).__module__.startswith("tests."), f"{table}: a built-in builder without an online path"
        pytest.skip("a plug-in without an online path (the predictor names it when it loads)")
    state = builder.online_state(store, 1)
    test_ids = store.read("items").filter(pl.col("split") == "test")["sample_id"].to_list()
    online = _online(builder, state, store, test_ids)
    stored = store.read(table).filter(pl.col("sample_id").is_in(test_ids)).sort("sample_id")
    if table == "folds":
        assert online.is_empty() and stored.is_empty()
    elif "embedding" in stored.columns and table.startswith(("text_emb", "image_emb")):
        a, b = np.stack(online["embedding"].to_numpy()), np.stack(stored["embedding"].to_numpy())
        cosine = (a * b).sum(axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        assert (cosine[np.linalg.norm(b, axis=1) > 0] > 0.98).all(), f"{table}: cosine {cosine.min()}"
        assert online.drop("embedding").equals(stored.drop("embedding"))
    else:
        assert online.select(stored.columns).equals(stored), f"{table}: new rows differ from the stored test rows"
    alone = _online(builder, state, store, test_ids[:3])
    assert alone.equals(online.filter(pl.col("sample_id").is_in(test_ids[:3]))), f"{table}: moved with batch-mates"
