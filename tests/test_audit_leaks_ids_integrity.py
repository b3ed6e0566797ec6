"""Audit cases (issue 22, second hostile audit): the target can never be a feature, a `predict` input's ids cannot
move other rows' prices, NaN never scores, stored files are verified, and what a killed writer leaves is cleaned.
Each test failed on the code before its fix (see the README's reliability table)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import optuna
import polars as pl
import pytest

from features.ingest import IngestError
from featurestore.builders import BuildContext, run_builders
from featurestore.config import MAX_TRIALS, Config, ConfigError, load_config, thawed
from featurestore.errors import IntegrityError, StaleTable
from featurestore.store import FeatureStore, atomic_write
from models.inference import predict_saved
from models.matrix import fit_spec, load_frame
from models.metrics import mape, smape
from models.registry import learner_settings, load_plugins
from models.train import LearnerBuilder, TrainedLearner
from pipeline.predict import predict_file
from pipeline.registry import builders_for, require_fresh
from pipeline.run import train_and_stack
from pipeline.stack import run_stack
from sql.readonly import run_query
from stacking.artifacts import load_stack_meta
from stacking.inputs import StackInputs, meta_frame
from stacking.record import StackRecord
from stacking.study import run_study
from tests.conftest import ROOT, SAMPLE, kill9, start_until
from tests.test_models import build, fast_config


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _flip(path: Path, at: float = 0.5) -> None:
    """One flipped byte in the middle of a file: bit rot, a bad copy."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x5A
    path.write_bytes(bytes(data))


def _statuses(config: Config, store: FeatureStore) -> dict[str, str]:
    return {r.table: r.status for r in run_builders(BuildContext(store, config, progress=False),
                                                    builders_for(config))}


# -- 1. the target is never a feature -------------------------------------------------------------------------

TABLE_SPELLINGS = ["items", "ITEMS", " items", '"items"', "main.items", "folds", "Folds", "oof__lgbm", "stack_oof",
                   "predictions", "manifest"]


@pytest.mark.parametrize("table", TABLE_SPELLINGS)
def test_a_learner_can_never_read_the_target_table(table: str) -> None:
    """Audit case: `[models.lgbm] tables = ["catalog", "items"]` made items.price a feature (lgbm "CV" 8.88,
    submission prices 1.8-3.0). Refused at load in every spelling, for built-in sections and variants alike."""
    with pytest.raises(ConfigError, match="never features"):
        load_config(None, {"models.lgbm.tables": ["catalog", table]})
    with pytest.raises(ConfigError, match="never features"):
        load_config(None, {"models.lgbm_2": {"learner": "lgbm", "tables": ["catalog", table]}})


@pytest.mark.parametrize("feature", ["items.price", "ITEMS.PRICE", 'items."price"', "main.items.price",
                                     "folds.fold", "catalog.price", 'catalog."Price"', "oof__lgbm.pred_log",
                                     "predictions.price", "stack_oof.pred_log"])
def test_a_raw_stack_feature_can_never_be_the_target(feature: str) -> None:
    """Audit case: `stacking.raw_features = ["items.price"]` gave a fake stack CV of 58.26 (honest: 73.74)."""
    with pytest.raises(ConfigError, match="stacking.raw_features"):
        load_config(None, {"stacking.raw_features": [feature]})


@pytest.mark.parametrize("override", [
    {"columns.numeric": ["price"]}, {"columns.categorical": ["price"]},
    {"columns.text": ["catalog_content", "price"]}, {"columns.group": "price"},
    {"columns.target": "list_price", "columns.numeric": ["list_price"]},
    {"target_encoding.columns": ["brand", "price"]},
    {"text_sparse.fields": [{"columns": ["items.price"], "analyzer": "onehot"}]},
    {"text_sparse.fields": [{"columns": ["folds.fold"], "analyzer": "onehot"}]},
])
def test_the_target_column_cannot_be_mapped_into_a_feature(override: dict) -> None:
    with pytest.raises(ConfigError, match="target|never"):
        load_config(None, override)


def test_the_shipped_configs_pass_the_guard() -> None:
    for path in sorted((ROOT / "configs").glob("*.toml")):
        load_config(path)


def test_a_config_built_in_code_meets_the_guard_where_tables_are_read_and_the_leak_is_real(
        small_config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time check has a second line where tables are read (a config mutated in code, a feature table
    that holds a `price` column). Control: with that guard switched off, a learner on `items` scores a
    "CV" no honest learner reaches on these 40 rows, so the guard guards a real leak."""
    store = FeatureStore(small_config.store.dir)
    _statuses(small_config, store)
    with pytest.raises(ConfigError, match="never features"):
        load_frame(store, ["catalog", "items"])
    with pytest.raises(ConfigError, match="never features|the target"):
        meta_frame(store, [], ["items.price"])
    leaky = store.read("items").select("sample_id", "price")
    store.write("leaky", leaky, builder="test", params={}, fingerprint="x", seconds=0.0)
    with pytest.raises(ConfigError, match="holds"):
        load_frame(store, ["catalog", "leaky"])
    assert load_frame(store, ["catalog"]).height == 50  # the honest feature set still loads
    renamed = store.read("items").select("sample_id", pl.col("price").log1p().alias("quality_score"))
    store.write("renamed", renamed, builder="test", params={}, fingerprint="y", seconds=0.0)
    frame = load_frame(store, ["catalog", "renamed"])
    with pytest.raises(ConfigError, match="renamed.quality_score equals log1p"):
        fit_spec(frame.filter(pl.col("split") == "train"), ["catalog", "renamed"], 100)

    config = thawed(small_config)
    # Mutated after load: the load-time check never ran. 40 rows: let LightGBM split at all.
    config.models.sections["lgbm"] = {"tables": ["catalog", "items"], "rounds": 60, "early_stopping_rounds": 10,
                                      "params": {"min_data_in_leaf": 3, "num_leaves": 7}}
    config.models.threads = 1
    with pytest.raises(ConfigError, match="never features"):
        run_builders(BuildContext(store, config, progress=False), [LearnerBuilder(config, "lgbm")])
    monkeypatch.setattr("models.matrix.feature_table_problem", lambda table: None)
    monkeypatch.setattr("models.matrix.label_column_problem", lambda column, target="price": None)
    monkeypatch.setattr("models.matrix._refuse_copies_of_the_target", lambda train, numeric: None)
    run_builders(BuildContext(store, config, progress=False), [LearnerBuilder(config, "lgbm")])
    leaked = TrainedLearner.of(store, "lgbm").oof_score
    config.models.sections["lgbm"]["tables"] = ["catalog"]
    run_builders(BuildContext(store, config, progress=False), [LearnerBuilder(config, "lgbm")])
    honest = TrainedLearner.of(store, "lgbm").oof_score
    assert leaked < honest / 2, (leaked, honest)  # 36 vs 78 SMAPE when written


# -- 2. a predict input's ids never move other rows' prices ---------------------------------------------------

@pytest.fixture(scope="module")
def stacked_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, FeatureStore]:
    """80 real labelled + 20 real unlabelled rows (integer ids), lgbm + ridge, a 3-candidate stack."""
    tmp = tmp_path_factory.mktemp("audit2")
    config = fast_config(tmp, pl.read_parquet(SAMPLE / "train.parquet").head(80),
                         pl.read_parquet(SAMPLE / "test.parquet").head(20), **{"models.learners": ["lgbm", "ridge"]})
    store = build(config)
    train_and_stack(config, store, trials=3, progress=False)
    return config, store


def _copy_store(store: FeatureStore, where: Path) -> FeatureStore:
    shutil.copytree(store.root, where)
    return FeatureStore(where)


@pytest.mark.parametrize("odd_id", ["0042", "17.5", "abc"])
def test_a_predict_input_with_an_id_that_does_not_fit_the_stores_type_is_refused_naming_it(
        stacked_small: tuple[Config, FeatureStore], tmp_path: Path, odd_id: str) -> None:
    """Audit case: one text, leading-zero or x.5 id in a `predict` input turned every id of the derived store
    into text; the folds were redrawn (512 of 632 training rows moved) and other rows' prices changed. The id
    type belongs to the training store: an id that does not fit is refused, naming the row, nothing written."""
    config, store = stacked_small
    rows = pl.read_parquet(config.data.test).with_columns(pl.col("sample_id").cast(pl.String))
    rows = rows.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(pl.lit(odd_id))
                             .otherwise(pl.col("sample_id")).alias("sample_id"))
    path = tmp_path / "mixed.csv"
    rows.write_csv(path)
    before = sorted(p.relative_to(store.root) for p in store.root.rglob("*"))
    with pytest.raises(IngestError, match=f"row 4, column 'sample_id': id '{odd_id}' is not a whole number"):
        predict_file(config, store, path, tmp_path / "out.csv", progress=False)
    assert not (tmp_path / "out.csv").exists()
    assert sorted(p.relative_to(store.root) for p in store.root.rglob("*")) == before


def test_ids_written_in_mixed_formats_are_cast_and_every_price_is_bit_identical(
        stacked_small: tuple[Config, FeatureStore], tmp_path: Path) -> None:
    """The same rows with their ids written as text, some as "123.0": cast to the store's integers, and every
    price equals the stored one bit for bit."""
    config, store = stacked_small
    rows = pl.read_parquet(config.data.test).with_columns(pl.col("sample_id").cast(pl.String))
    rows = rows.with_columns(pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.col("sample_id") + ".0")
                             .otherwise(pl.col("sample_id")).alias("sample_id"))
    path = tmp_path / "mixed_formats.csv"
    rows.write_csv(path)
    predicted = predict_file(config, store, path, tmp_path / "out.csv", progress=False)
    assert predicted["sample_id"].dtype == pl.Int64
    stored = store.read("predictions")
    assert predicted.sort("sample_id").equals(stored.sort("sample_id"))


# -- 3. NaN never scores, duplicates are refused, nothing is committed before it is checked ---------------------

def test_a_nan_prediction_is_an_error_never_a_perfect_score() -> None:
    """Audit case: SMAPE's 0/0 rule scored a NaN prediction as 0 (the stack recorded `stack_cv 0.0`)."""
    true = np.array([10.0, 20.0, 30.0])
    assert smape(true, true) == 0.0  # control
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="not finite"):
            smape(true, np.array([10.0, bad, 30.0]))
        with pytest.raises(ValueError, match="not finite"):
            mape(true, np.array([bad, 20.0, 30.0]))


@pytest.mark.parametrize("override", [{"models.learners": ["lgbm", "lgbm"]}, {"stacking.metas": ["blend", "blend"]},
                                      {"builders": ["items", "folds", "items"]}])
def test_duplicate_learner_meta_and_builder_names_are_refused_at_load(override: dict) -> None:
    with pytest.raises(ConfigError, match="more than once"):
        load_config(None, override)


def test_a_stack_that_predicts_nan_commits_nothing(small_config: Config) -> None:
    """Audit case: NaN `predictions`/`stack_oof` tables were committed before the submission check failed."""
    store = FeatureStore(small_config.store.dir)
    _statuses(small_config, store)
    frame = store.read("items").join(store.read("folds"), on="sample_id", how="left").with_columns(
        pl.col("fold").fill_null(-1))
    rng = np.random.default_rng(0)
    for name in ("lgbm", "ridge"):
        log_price = np.log1p(frame["price"].fill_null(np.nan).to_numpy()) + rng.normal(0, 0.3, frame.height)
        table = frame.select("sample_id", "fold").with_columns(pl.Series("pred", log_price),
                                                               pl.Series("pred_log", log_price),
                                                               pl.Series("pred_price", np.expm1(log_price)))
        store.write(f"oof__{name}", table, builder="test", params={}, fingerprint=name, seconds=0.0)
    config = thawed(small_config)
    config.models.learners, config.stacking.metas = ["lgbm", "ridge"], ["blend"]
    config.models.threads = 1
    with pytest.raises(ValueError, match="non-finite"):
        run_stack(store, config, 3, [])
    assert not store.has_table("predictions") and not store.has_table("stack_oof")
    assert not (store.root / config.stacking.submission).exists()


# -- 4. a changed train file, 5. bounded trials -----------------------------------------------------------------

def test_a_changed_train_file_in_the_config_is_refused_naming_both_paths(small_config: Config,
                                                                        tmp_path: Path) -> None:
    """Audit case: a changed `data.train` was silently ignored: `stack` and `predict` used the file the store
    was built from, exit 0."""
    store = FeatureStore(small_config.store.dir)
    _statuses(small_config, store)
    same_bytes = tmp_path / "same.parquet"
    shutil.copy(small_config.data.train, same_bytes)
    moved = thawed(small_config)
    moved.data.train = str(same_bytes)
    require_fresh(moved, store, {"folds"})  # control: the same bytes elsewhere are the same file
    other = tmp_path / "other.parquet"
    pl.read_parquet(small_config.data.train).with_columns(pl.col("price") * 2).write_parquet(other)
    changed = thawed(small_config)
    changed.data.train = str(other)
    with pytest.raises(StaleTable, match=f"data.train is '{other}'.*built from '{small_config.data.train}'"):
        require_fresh(changed, store, {"folds"})


def test_trials_beyond_the_bound_are_refused_in_under_a_second(tmp_path: Path) -> None:
    """Audit case: `--trials 1000000000` reached 8.5 GB in 30 s before any candidate ran."""
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expected 1 to 10,000"):
        load_config(None, {"stacking.trials": 10**9})
    assert time.perf_counter() - start < 1.0
    load_config(None, {"stacking.trials": MAX_TRIALS})  # control: the bound itself is allowed
    result = _cli("stack", "--trials", "1000000000", "--store", str(tmp_path / "s"))
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "expected 1 to 10,000" in result.stderr and not (tmp_path / "s").exists()


# -- 6. stored files are verified --------------------------------------------------------------------------------

def test_a_flipped_byte_in_a_table_is_detected_and_the_table_rebuilt_not_reused(small_config: Config) -> None:
    """Audit case: one flipped bit in a table's Parquet page changed results with exit 0, and a corrupt table
    was reported "reused"."""
    store = FeatureStore(small_config.store.dir)
    _statuses(small_config, store)
    assert _statuses(small_config, store)["catalog"] == "reused"  # control
    before = store.read("catalog")
    _flip(store.table_path("catalog"))
    with pytest.raises(IntegrityError, match="catalog.parquet is damaged"):
        store.read("catalog")
    with pytest.raises(IntegrityError, match="damaged"):
        load_frame(store, ["catalog"])
    assert _statuses(small_config, store)["catalog"] == "built"
    assert store.read("catalog").equals(before)


def test_a_flipped_byte_in_a_model_file_or_the_meta_learner_is_detected(
        stacked_small: tuple[Config, FeatureStore], tmp_path: Path) -> None:
    """Audit case: one flipped bit in a LightGBM leaf or in the meta-learner's JSON changed every price, exit 0."""
    config, trained = stacked_small
    store = _copy_store(trained, tmp_path / "copy")
    record = TrainedLearner.of(store, "lgbm")
    predict_saved(store, store, config, "lgbm")  # control: intact files load
    builder = LearnerBuilder(config, "lgbm")
    assert builder.artifacts_ok(store, store.info("oof__lgbm").fingerprint)
    model = store.root / record.model_dir / "fold0.lgbm.txt"
    text = model.read_text()
    leaf = text.index("leaf_value=") + len("leaf_value=")
    model.write_text(text[:leaf] + ("9" if text[leaf] != "9" else "8") + text[leaf + 1:])  # one digit of a leaf
    with pytest.raises(IntegrityError, match="fold0.lgbm.txt is damaged.*--learner lgbm --force"):
        predict_saved(store, store, config, "lgbm")
    assert not builder.artifacts_ok(store, store.info("oof__lgbm").fingerprint)  # `train` retrains it

    stack = StackRecord.of(store)
    load_stack_meta(store, stack, config)  # control
    meta = store.root / stack.meta_model
    meta.write_text(meta.read_text().replace('"n_base": 2', '"n_base": 1', 1))  # one digit
    with pytest.raises(IntegrityError, match="rerun `python cli.py stack`"):
        load_stack_meta(store, stack, config)


def test_a_flipped_byte_in_the_onnx_export_is_detected_and_the_model_exported_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit case: 64 flipped bytes in the cached ONNX export changed 441 of 832 rows' neighbour lists, exit 0.
    The export records each file's sha256; a cached file that fails it is exported again. Staging folders of
    exports killed mid-way (173 MB each) are removed. (The export itself is stubbed: its real run is covered
    by the embedding tests.)"""
    from embeddings import onnx_text

    exports = []
    monkeypatch.setattr(onnx_text, "export_key", lambda model_dir: "k")
    monkeypatch.setattr(onnx_text, "_export_fp32", lambda st, path: path.write_bytes(b"raw"))
    monkeypatch.setattr(onnx_text, "_fuse", lambda raw, out, st: (exports.append(1), out.write_bytes(b"fp32" * 64)))
    monkeypatch.setattr(onnx_text, "_quantize_checked",
                        lambda st, fp32, out, name: (out.write_bytes(b"int8" * 64), {})[1])
    cache = tmp_path / "cache"
    dead = cache / "onnx" / "minilm-old.tmp999999999"
    alive = cache / "onnx" / f"minilm-new.tmp{os.getpid()}"
    dead.mkdir(parents=True)
    alive.mkdir(parents=True)
    path = onnx_text.exported_model(None, "minilm", tmp_path, cache, "onnx_int8")
    assert not dead.exists() and alive.exists()  # only the dead export's staging folder goes
    assert onnx_text.exported_model(None, "minilm", tmp_path, cache, "onnx_int8") == path and len(exports) == 1
    _flip(path)
    assert onnx_text.exported_model(None, "minilm", tmp_path, cache, "onnx_int8") == path
    assert len(exports) == 2 and path.read_bytes() == b"int8" * 64


def _synthetic_inputs(n: int = 160, seed: int = 0) -> StackInputs:
    rng = np.random.default_rng(seed)
    price = np.exp(rng.normal(3, 1, n))
    fold = np.arange(n) % 4
    fold[-20:] = -1
    x = np.log1p(price)[:, None] + rng.normal(0, [0.3, 0.5], (n, 2))
    price[fold < 0] = np.nan
    return StackInputs(ids=np.arange(n), fold=fold, price=price, x=x, feature_names=["a", "b"], n_base=2)


def test_a_damaged_journal_score_is_evaluated_again_not_trusted(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit case: one flipped digit in a journal score made another meta-learner win, exit 0."""
    from optuna.storages.journal import JournalFileBackend

    import stacking.study as stack_module

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = load_config(None, {"stacking.metas": ["blend", "ridge"]})
    inputs = _synthetic_inputs()
    journal = tmp_path / "optuna.journal"

    def storage() -> optuna.storages.JournalStorage:
        return optuna.storages.JournalStorage(JournalFileBackend(str(journal)))

    first = run_study("s", inputs, config, 5, storage())
    evaluated = []
    real = stack_module.evaluate
    monkeypatch.setattr(stack_module, "evaluate", lambda c, i, s: (evaluated.append(c.index), real(c, i, s))[1])
    assert run_study("s", inputs, config, 5, storage()).keys() == first.keys() and evaluated == []  # control
    lines = journal.read_text().splitlines()
    for number, line in enumerate(lines):
        record = json.loads(line)
        if "scores" in record.get("user_attr", {}) and record["user_attr"]["scores"]["final"] > 1:
            record["user_attr"]["scores"]["final"] = 0.001  # a "perfect" candidate, written by no fit
            lines[number] = json.dumps(record)
            break
    journal.write_text("\n".join(lines) + "\n")
    again = run_study("s", inputs, config, 5, storage())
    assert len(evaluated) == 1
    assert {i: s.final for i, (_, s) in again.items()} == {i: s.final for i, (_, s) in first.items()}


# -- low: one-line errors, read-only commands, leftovers of a killed writer, CSV rows, ranges, settings ----------

def test_sql_with_a_table_typo_and_predict_without_input_are_one_line_errors(small_config: Config) -> None:
    """Audit case: DuckDB errors from `sql` (their classes live in `_duckdb`) and typer's usage errors (its own
    copy of click) printed 30-54-line tracebacks."""
    store = FeatureStore(small_config.store.dir)
    _statuses(small_config, store)
    typo = _cli("sql", "SELECT * FROM catalg", "--store", str(store.root))
    assert typo.returncode == 1 and len(typo.stderr.strip().splitlines()) == 1
    assert "catalg" in typo.stderr and "Traceback" not in typo.stderr
    usage = _cli("predict")
    assert usage.returncode == 2 and usage.stderr.strip().splitlines() == [
        "error: Missing option '--input'.  (see `python cli.py predict --help`)"]


def test_read_only_commands_open_the_store_read_only_and_do_not_wait_behind_a_duckdb_client(
        small_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Audit case: read-only commands opened features.duckdb for writing: they failed on a read-only store and
    waited (60 s, then failed) behind a read-only `duckdb` client."""
    store = FeatureStore(small_config.store.dir)
    _statuses(small_config, store)
    modes = []
    real_connect = duckdb.connect
    monkeypatch.setattr(duckdb, "connect", lambda path=":memory:", read_only=False, **kw: (
        modes.append(read_only), real_connect(path, read_only=read_only, **kw))[1])
    FeatureStore(store.root, create=False).manifest()
    assert modes and all(modes)
    monkeypatch.undo()
    marker = tmp_path / "open"
    holder = start_until([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, time, pathlib
        con = duckdb.connect({str(store.db_path)!r}, read_only=True)
        pathlib.Path({str(marker)!r}).touch()
        time.sleep(120)
    """)], marker)
    try:
        start = time.perf_counter()
        for args in (["tables"], ["sql", "SELECT count(*) AS n FROM catalog"]):
            result = _cli(*args, "--store", str(store.root))
            assert result.returncode == 0, result.stderr
        assert time.perf_counter() - start < 30
    finally:
        kill9(holder)


def test_what_a_killed_writer_leaves_is_cleaned_and_the_next_stack_does_not_stall(small_config: Config,
                                                                                   tmp_path: Path) -> None:
    """Audit case: kill -9 left `.tmp-*.parquet` files and Optuna's journal lock (the next `stack` stalled 30 s).
    A writer killed while it holds both: the next writer removes the temp file and the stale lock at once."""
    store = FeatureStore(small_config.store.dir)
    marker = tmp_path / "holding"
    victim = start_until([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from featurestore.store import FeatureStore, atomic_write
        from stacking.journal import journal_storage
        store = FeatureStore({str(store.root)!r})
        journal_storage(store)._backend._lock.acquire()
        def hang(tmp):
            tmp.write_bytes(b"half a table")
            Path({str(marker)!r}).touch()
            time.sleep(120)
        atomic_write(store.tables_dir / "catalog.parquet", hang)
    """)], marker)
    kill9(victim)
    assert list(store.tables_dir.glob(".tmp-*")) and os.path.lexists(f"{store.journal_path}.lock")  # the mess
    from stacking.journal import journal_storage

    start = time.perf_counter()
    again = FeatureStore(store.root)
    optuna.create_study(storage=journal_storage(again), study_name="after-a-kill")
    assert time.perf_counter() - start < 10
    assert not list(store.root.rglob(".tmp-*")) and not os.path.lexists(f"{store.journal_path}.lock")
    live = store.tables_dir / f".tmp-{os.getpid()}-x.parquet"  # control: a live writer's temp file stays
    live.write_bytes(b"in flight")
    FeatureStore(store.root)
    assert live.exists()
    atomic_write(live.with_name("done.txt"), lambda tmp: tmp.write_text("ok"))


def test_a_ragged_csv_row_is_named_by_its_data_row_and_a_short_test_row_is_refused(tmp_path: Path,
                                                                                   real_train: pl.DataFrame,
                                                                                   real_test: pl.DataFrame) -> None:
    """Audit case: a ragged row was reported by physical line (a quoted newline shifted it), and a short row in
    a test file was padded with nulls silently."""
    train_path = tmp_path / "train.csv"
    lines = real_train.head(6).with_columns(pl.col("catalog_content").str.replace_all("\n", " "))
    lines = lines.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("two\nlines"))
                               .otherwise(pl.col("catalog_content")).alias("catalog_content"))
    text = lines.write_csv()
    rows = text.splitlines(keepends=True)
    rows[5] = rows[5].rstrip("\n") + ",extra\n"  # physical line 6 = data row 4 (row 1 spans two lines)
    train_path.write_text("".join(rows))
    config = load_config(None, {"data.train": str(train_path), "data.test": "", "store.dir": str(tmp_path / "s")})
    with pytest.raises(IngestError, match="train.csv, row 4: has 5 fields but the header has 4"):
        run_builders(BuildContext(FeatureStore(config.store.dir), config, progress=False), builders_for(config,
                                                                                                       ["items"]))
    test_path = tmp_path / "test.csv"
    short = real_test.head(3).with_columns(pl.col("catalog_content").str.replace_all("\n", " ")).write_csv()
    cut = short.splitlines(keepends=True)
    cut[2] = cut[2].rsplit(",", 1)[0] + "\n"  # data row 2 lost its last field
    test_path.write_text("".join(cut))
    real_train.head(20).write_parquet(tmp_path / "train.parquet")
    config = load_config(None, {"data.train": str(tmp_path / "train.parquet"), "data.test": str(test_path),
                                "store.dir": str(tmp_path / "s2")})
    with pytest.raises(IngestError, match="test.csv, row 2: has 2 fields but the header has 3"):
        run_builders(BuildContext(FeatureStore(config.store.dir), config, progress=False), builders_for(config,
                                                                                                       ["items"]))


@pytest.mark.parametrize("price", [5e-324, 1e300])
def test_targets_outside_the_range_are_refused_at_ingest_naming_the_row(tmp_path: Path, real_train: pl.DataFrame,
                                                                       price: float) -> None:
    """Audit case: 5e-324 and 1e300 passed ingest and failed inside XGBoost after LightGBM had trained."""
    rows = real_train.head(10).with_columns(pl.when(pl.int_range(pl.len()) == 6).then(price)
                                            .otherwise(pl.col("price")).alias("price"))
    rows.write_parquet(tmp_path / "train.parquet")
    config = load_config(None, {"data.train": str(tmp_path / "train.parquet"), "data.test": "",
                                "store.dir": str(tmp_path / "s")})
    with pytest.raises(IngestError, match="row 7, column 'price'.*outside"):
        run_builders(BuildContext(FeatureStore(config.store.dir), config, progress=False), builders_for(config,
                                                                                                       ["items"]))


@pytest.mark.parametrize("section", [{"epochs": 0}, {"batch_size": -1}, {"max_seq_length": 0},
                                     {"learning_rate": 0.0}])
def test_finetune_settings_are_validated(section: dict) -> None:
    """Audit case: `finetune` epochs / batch size were not validated (0 epochs trained nothing, exit 0). Refused
    at load (every learner section is checked there)."""
    with pytest.raises(ConfigError, match="models.finetune"):
        load_config(None, {"models.finetune": section})


def test_variants_resolve_in_any_section_order() -> None:
    """Audit case: a variant of a variant was refused when its section came before its base's."""
    config = load_config(None, {"models.ridge_b": {"learner": "ridge_a", "alpha": 9.0},
                                "models.ridge_a": {"learner": "ridge", "tables": ["catalog", "text_sparse"]}})
    load_plugins(config)
    settings = learner_settings(config, "ridge_b")
    assert settings.alpha == 9.0 and settings.tables == ["catalog", "text_sparse"]
    with pytest.raises(ConfigError, match="cycle"):
        load_config(None, {"models.ridge_x": {"learner": "ridge_y"}, "models.ridge_y": {"learner": "ridge_x"}})


def test_sql_neither_follows_a_planted_symlink_nor_materialises_what_it_does_not_print(small_config: Config,
                                                                                        tmp_path: Path) -> None:
    """Audit case: `sql` followed a symlink planted in tables/ and materialised whole results to print 50 rows."""
    store = FeatureStore(small_config.store.dir)
    _statuses(small_config, store)
    start = time.perf_counter()
    assert run_query(store, "SELECT * FROM range(300000000) t(i), catalog", limit=50).height == 50
    assert time.perf_counter() - start < 10
    secret = tmp_path / "secret.parquet"
    pl.DataFrame({"sample_id": [1], "secret": ["x"]}).write_parquet(secret)
    store.table_path("catalog").unlink()
    store.table_path("catalog").symlink_to(secret)
    with pytest.raises(IntegrityError, match="symbolic link"):
        run_query(store, "SELECT * FROM catalog")
