"""Audit cases (issue 12): the store lock, staleness after a changed train file, relocatable stores, torn
writes, and the CLI's one-line errors. Each test failed before its fix."""

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
import polars as pl
import pytest

from featurestore.builders import BuildContext, run_builders
from featurestore.config import Config, edited
from featurestore.errors import StaleTable, StoreBusy, UserError
from featurestore.lock import writer_lock
from featurestore.store import FeatureStore
from pipeline.registry import builders_for, require_fresh
from tests.conftest import ROOT, SAMPLE, kill9, start_until


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _build(config: Config, store: FeatureStore, names: list[str] | None = None) -> dict[str, str]:
    results = run_builders(BuildContext(store, config, progress=False), builders_for(config, names))
    return {r.table: r.status for r in results}


def _hold(script: str, marker: Path) -> subprocess.Popen[bytes]:
    """Start a process that does `script` and then touches `marker` and sleeps."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        {script}
    """)
    return start_until([sys.executable, "-c", code], marker, timeout=60)


# -- the store lock -----------------------------------------------------------------------------------------

def test_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    """Audit case: two writers on one store died with a raw DuckDB lock traceback, or the last silently won."""
    root = tmp_path / "store"
    marker = tmp_path / "held"
    holder = _hold(f"""
        from featurestore.lock import writer_lock
        with writer_lock(Path({str(root)!r}), "stack"):
            Path({str(marker)!r}).touch()
            time.sleep(60)
    """, marker)
    try:
        with pytest.raises(StoreBusy, match=rf"busy \(pid {holder.pid}, `stack`"), writer_lock(root, "train"):
            pass
        busy = _cli("build-features", "--store", str(root), "-q")
        assert busy.returncode == 1 and f"pid {holder.pid}" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        kill9(holder)
    assert (root / ".writer.lock").read_text()  # the dead holder's record is still there...
    with writer_lock(root, "train"):  # ...and is taken over, not obeyed
        assert json.loads((root / ".writer.lock").read_text())["pid"] == os.getpid()


def test_a_reader_waits_for_a_writing_connection_instead_of_breaking_it(small_config: Config,
                                                                       tmp_path: Path) -> None:
    """Audit case: a concurrent `sql` reader killed a build (DuckDB allows one writing process per file)."""
    store = FeatureStore(small_config.store.dir)
    _build(small_config, store, ["items"])
    marker = tmp_path / "writing"
    writer = _hold(f"""
        from featurestore.store import FeatureStore
        store = FeatureStore({small_config.store.dir!r})
        with store.connect(read_only=False) as con:
            Path({str(marker)!r}).touch()
            time.sleep(1.5)
            con.execute("CREATE OR REPLACE TABLE scratch_note AS SELECT 1 AS x")
    """, marker)
    started = time.time()
    assert store.info("items") is not None  # waits for the writer's connection, then reads
    assert time.time() - started > 0.5
    writer.wait(timeout=30)
    assert writer.returncode == 0


def test_an_outside_duckdb_client_makes_a_writer_wait_then_fail_clearly(small_config: Config, tmp_path: Path,
                                                                        monkeypatch) -> None:
    import featurestore.store as store_module

    store = FeatureStore(small_config.store.dir)
    marker = tmp_path / "open"
    client = _hold(f"""
        import duckdb
        con = duckdb.connect({str(store.db_path)!r}, read_only=True)
        Path({str(marker)!r}).touch()
        time.sleep(2.5)
    """, marker)
    monkeypatch.setattr(store_module, "LOCK_WAIT_S", 0.5)
    with pytest.raises(StoreBusy, match=rf"held open by .*PID {client.pid}"):
        _build(small_config, store, ["items"])
    monkeypatch.setattr(store_module, "LOCK_WAIT_S", 30.0)
    assert _build(small_config, store, ["items"])["items"] == "built"  # waits for the client to close
    client.wait()


# -- staleness ------------------------------------------------------------------------------------------------

def test_a_changed_train_file_makes_its_tables_stale_until_rebuilt(small_config: Config) -> None:
    """Audit case: `train` after `ingest` of a changed file used the new prices with the old folds and
    encodings, silently."""
    store = FeatureStore(small_config.store.dir)
    _build(small_config, store)
    require_fresh(small_config, store, {"catalog", "folds"})  # fresh: no error
    train = pl.read_parquet(small_config.data.train)
    train.with_columns(pl.col("price") * 2).write_parquet(small_config.data.train)
    with pytest.raises(StaleTable, match="'items': its input files changed"):
        require_fresh(small_config, store, {"catalog", "folds"})
    _build(small_config, store, ["items"])  # what `ingest` does
    with pytest.raises(StaleTable, match="'folds': input table\\(s\\) items changed") as caught:
        require_fresh(small_config, store, {"catalog", "folds"})
    assert "build-features" in str(caught.value)
    _build(small_config, store)
    require_fresh(small_config, store, {"catalog", "folds"})


def test_train_refuses_stale_features_through_the_cli(small_config: Config, tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('builders = ["items", "folds", "catalog"]\n[catalog]\nuse_spacy = false\n[folds]\nk = 4\n'
                    'price_bands = 4\n[models]\nlearners = ["lgbm"]\n[models.lgbm]\ntables = ["catalog"]\n'
                    'rounds = 20\n')
    common = ["--config", str(toml), "--store", small_config.store.dir]
    built = _cli("build-features", *common, "--train", small_config.data.train, "--test", small_config.data.test,
                 "-q")
    assert built.returncode == 0, built.stderr
    train = pl.read_parquet(small_config.data.train)
    train.with_columns(pl.col("price") + 1).write_parquet(small_config.data.train)
    assert _cli("ingest", *common, "--train", small_config.data.train, "--test", small_config.data.test,
                "-q").returncode == 0
    refused = _cli("train", *common, "-q")
    assert refused.returncode == 1 and "stale" in refused.stderr and "'folds'" in refused.stderr
    assert not (Path(small_config.store.dir) / "tables" / "oof__lgbm.parquet").exists()
    assert _cli("build-features", *common, "-q").returncode == 0  # the files it was built from are kept
    # Audit case: bad LightGBM params were a raw LightGBMError traceback.
    toml.write_text(toml.read_text() + "params = {num_leaves = 1}\n")
    bad = _cli("train", *common, "-q")
    assert bad.returncode == 1 and "LightGBMError" in bad.stderr and "num_leaves" in bad.stderr
    assert "Traceback" not in bad.stderr


# -- relocatable stores, torn writes ----------------------------------------------------------------------------

def test_a_copied_store_reads_its_own_files_and_a_moved_one_still_works(small_config: Config,
                                                                        tmp_path: Path) -> None:
    """Audit case: views held absolute paths, so a `cp -a` copy silently read the original's tables and a moved
    store failed with "No files found"."""
    original = FeatureStore(small_config.store.dir)
    _build(small_config, original)
    copy_root = tmp_path / "copy"
    shutil.copytree(original.root, copy_root)
    copied = FeatureStore(copy_root)
    info = original.info("catalog")
    original.write("catalog", original.read("catalog").head(3), builder="x", params=info.params,
                   fingerprint=info.fingerprint, seconds=0.0)  # the original changes after the copy
    with duckdb.connect(str(copied.db_path), read_only=True) as con:  # the plain duckdb client
        assert con.execute("SELECT count(*) FROM catalog").fetchone()[0] == 50
    moved_root = tmp_path / "moved"
    copy_root.rename(moved_root)
    moved = FeatureStore(moved_root, create=False)
    with duckdb.connect(str(moved.db_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM catalog").fetchone()[0] == 50
    result = _cli("sql", "SELECT count(*) AS n FROM catalog", "--store", str(moved_root))
    assert result.returncode == 0 and "50" in result.stdout


def test_a_crash_between_rename_and_manifest_is_detected(small_config: Config, monkeypatch) -> None:
    """The table file was replaced but its manifest row was not: that file must not be trusted as fresh."""
    import featurestore.store as store_module

    store = FeatureStore(small_config.store.dir)
    _build(small_config, store)
    info = store.info("catalog")

    def crash(*args: object) -> None:
        raise OSError("killed after the rename")

    monkeypatch.setattr(store_module, "_create_view", crash)
    with pytest.raises(OSError, match="after the rename"):
        store.write("catalog", store.read("catalog").head(2), builder="x", params={}, fingerprint="other",
                    seconds=0.0)
    monkeypatch.undo()
    assert store.info("catalog").fingerprint == info.fingerprint  # the manifest still names the old table
    assert _build(small_config, store)["catalog"] == "built"
    assert store.read("catalog").height == 50


def test_a_torn_journal_line_is_cut_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    from stacking.journal import journal_storage

    store = FeatureStore(tmp_path / "s")
    journal = store.root / "optuna.journal"
    journal.write_text('{"op_code": 0, "worker_id": "a", "study_name": "x", "directions": [1]}\n{"op_code": 4, "wor')
    journal_storage(store)  # no bare JSON error
    assert journal.read_text().endswith("[1]}\n")
    journal.write_text('{"op_code": 0}\nnot json\n{"op_code": 0}\n')
    with pytest.raises(UserError, match="line 2: not a JSON record"):
        journal_storage(store)


# -- the CLI's one error boundary ---------------------------------------------------------------------------------

def test_read_only_commands_do_not_create_a_store(tmp_path: Path) -> None:
    """Audit case: `tables --store typo` made a folder (and an empty store) named typo."""
    nowhere = tmp_path / "typo"
    for args in (["tables"], ["sql", "SELECT 1"], ["report"]):
        result = _cli(*args, "--store", str(nowhere))
        assert result.returncode == 1, result.stderr
        assert "no feature store" in result.stderr and "Traceback" not in result.stderr
    assert not nowhere.exists()


@pytest.mark.parametrize("case", ["empty_csv", "corrupt_parquet", "ragged_csv"])
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path: Path, case: str) -> None:
    if case == "empty_csv":
        bad, needle = tmp_path / "train.csv", "file is empty"
        bad.write_bytes(b"")
    elif case == "corrupt_parquet":
        bad, needle = tmp_path / "train.parquet", "not a readable Parquet file"
        bad.write_bytes(b"PAR1 this is not parquet PAR1")
    else:
        bad, needle = tmp_path / "train.csv", "row 2: has 4 fields but the header has 3"
        bad.write_text("sample_id,catalog_content,price\n1,a,2.0\n2,b,c,3.0\n3,d,4.0\n")
    result = _cli("ingest", "--store", str(tmp_path / "s"), "--train", str(bad), "--test",
                  str(SAMPLE / "test.parquet"), "-q")
    assert result.returncode == 1
    assert needle in result.stderr and str(bad) in result.stderr and "Traceback" not in result.stderr
    debug = _cli("--debug", "ingest", "--store", str(tmp_path / "s"), "--train", str(bad), "--test",
                 str(SAMPLE / "test.parquet"), "-q")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_config_mistakes_fail_before_any_training(tmp_path: Path) -> None:
    """Audit cases: `learners = []` and a bad meta-learner name were raw tracebacks, the latter only after the
    base learners had trained; bad LightGBM params were a raw LightGBMError traceback."""
    store = tmp_path / "s"
    for body, needle in (("[models]\nlearners = []\n", "models.learners is empty"),
                         ('[stacking]\nmetas = ["blend", "ridgee"]\n', "unknown meta-learner 'ridgee'")):
        toml = tmp_path / "c.toml"
        toml.write_text(body)
        started = time.time()
        result = _cli("stack", "--config", str(toml), "--store", str(store), "-q")
        assert result.returncode == 1 and needle in result.stderr and "Traceback" not in result.stderr
        assert time.time() - started < 60 and not store.exists()


def test_a_store_made_by_an_older_version_retrains(small_config: Config, tmp_path: Path) -> None:
    """An `oof__` record written before a field existed must not stop the retrain that replaces it (found when
    the Mercari benchmark store of an earlier session crashed `train` with a KeyError)."""
    from models.train import TrainedLearner
    from pipeline.run import train_learners

    config = edited(small_config, {"models.learners": ["ridge"], "models.ridge": {"tables": ["catalog"]}})
    store = FeatureStore(config.store.dir)
    _build(config, store)
    train_learners(config, store, progress=False)
    info = store.info("oof__ridge")
    old = {k: v for k, v in info.extra.items() if k not in ("metric", "sample_weight", "target")}
    store.write("oof__ridge", store.read("oof__ridge"), builder=info.builder, params=info.params,
                fingerprint="older-version", seconds=0.0, extra=old)
    with pytest.raises(StaleTable, match="older version"):
        TrainedLearner.of(store, "ridge")
    assert [r.status for r in train_learners(config, store, progress=False)] == ["built"]
    assert TrainedLearner.of(store, "ridge").metric == "smape"
