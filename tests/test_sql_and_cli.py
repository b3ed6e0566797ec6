"""The CLI as a user runs it, read-only SQL, and the config defaults."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from featurestore.config import Config, ConfigError, load_config
from featurestore.store import FeatureStore
from sql.readonly import ReadOnlyViolation, run_query
from tests.conftest import ROOT, SAMPLE, make_config


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def built_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CLI build shared by the module's tests (each CLI start costs seconds of imports)."""
    tmp_path = tmp_path_factory.mktemp("cli")
    small_config = make_config(tmp_path, pl.read_parquet(SAMPLE / "train.parquet").head(40),
                               pl.read_parquet(SAMPLE / "test.parquet").head(10))
    args = ["build-features", "--store", small_config.store.dir, "--train", small_config.data.train,
            "--test", small_config.data.test, "-q"]
    config_path = tmp_path / "c.toml"
    config_path.write_text(
        'builders = ["items", "folds", "catalog"]\n[catalog]\nuse_spacy = false\n[folds]\nk = 4\nprice_bands = 4\n'
    )
    result = _cli(*args, "--config", str(config_path))
    assert result.returncode == 0, result.stderr
    assert "catalog" in result.stdout and "built" in result.stdout
    return Path(small_config.store.dir)


def test_cli_build_then_sql(built_store: Path, tmp_path: Path) -> None:
    result = _cli("sql", "SELECT unit, count(*) AS n FROM catalog GROUP BY 1 ORDER BY n DESC", "--store",
                  str(built_store))
    assert result.returncode == 0, result.stderr
    assert "oz" in result.stdout and "fl_oz" in result.stdout
    out = tmp_path / "units.parquet"
    result = _cli("sql", "SELECT * FROM items", "--store", str(built_store), "--out", str(out))
    assert result.returncode == 0 and pl.read_parquet(out).height == 50
    tables = _cli("tables", "--store", str(built_store))
    assert tables.returncode == 0 and "CatalogBuilder" in tables.stdout


def test_read_only_commands_do_not_import_the_learners(built_store: Path) -> None:
    """`tables` and `sql` never train: they skip the learner-section check, whose imports (torch, LightGBM, XGBoost,
    CatBoost) took `tables` from 0.5 s to 4 s."""
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import cli; "
              f"code = cli.main(['tables', '--store', {str(built_store)!r}]); "
              "print('LOADED', sorted(m for m in ('torch', 'lightgbm', 'xgboost', 'catboost') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout


@pytest.mark.parametrize(
    "query",
    ["DROP VIEW catalog", "COPY (SELECT * FROM items) TO '{out}'", "CREATE TABLE x AS SELECT 1",
     "ATTACH '{out}.db' AS other", "SELECT 1; DELETE FROM manifest", "SET threads = 1", "INSTALL httpfs"],
)
def test_sql_is_read_only(built_store: Path, tmp_path: Path, query: str) -> None:
    out = tmp_path / "leak.csv"
    store = FeatureStore(built_store)
    with pytest.raises(ReadOnlyViolation):
        run_query(store, query.format(out=out))
    assert not out.exists()
    result = _cli("sql", query.format(out=out), "--store", str(built_store))
    assert result.returncode == 1 and "read-only" in result.stderr
    assert run_query(store, "SELECT count(*) AS n FROM catalog")["n"].item() == 50


def test_cli_reports_bad_input_clearly(tmp_path: Path, real_train: pl.DataFrame) -> None:
    bad = tmp_path / "bad.parquet"
    real_train.head(5).with_columns(price=pl.lit(float("nan"))).write_parquet(bad)
    result = _cli("ingest", "--train", str(bad), "--test", "", "--store", str(tmp_path / "s"))
    assert result.returncode == 1
    assert "bad.parquet, row 1, column 'price'" in result.stderr
    assert not (tmp_path / "s" / "tables" / "items.parquet").exists()


def test_help_everywhere() -> None:
    for command in ([], ["ingest"], ["build-features"], ["tables"], ["sql"]):
        result = _cli(*command, "--help")
        assert result.returncode == 0 and "Usage" in result.stdout


def test_default_toml_matches_code_defaults() -> None:
    """The file's values are the code's defaults; each learner's `[models.<name>]` section lists exactly its
    learner's default settings (the dataclass beside the learner)."""
    from models.registry import LEARNERS

    loaded = load_config(ROOT / "configs" / "default.toml")
    sections = loaded.models.sections
    as_loaded = dataclasses.asdict(loaded)
    as_loaded["models"]["sections"] = {}
    assert as_loaded == dataclasses.asdict(Config())
    documented = {name for name, cls in LEARNERS.items() if cls.__module__.startswith("models.learners.")}
    assert set(sections) == documented, "every built-in learner has its section in configs/default.toml"
    for name, raw in sections.items():
        defaults = LEARNERS[name].default_settings()
        assert raw == dataclasses.asdict(defaults), f"[models.{name}] differs from {type(defaults).__name__}"


def _missing_keys(obj: object, toml: dict, where: str) -> list[str]:
    missing = []
    for f in dataclasses.fields(obj):
        path = f"{where}.{f.name}".lstrip(".")
        if f.metadata.get("sections"):  # filled from other sections' names, not a key of its own
            continue
        if f.name not in toml:
            missing.append(path)
        elif dataclasses.is_dataclass(getattr(obj, f.name)):
            missing += _missing_keys(getattr(obj, f.name), toml[f.name], path)
    return missing


def test_every_config_key_is_documented_in_default_toml() -> None:
    """Not only do the values agree: every key is written out in configs/default.toml, where its comment is."""
    import tomllib

    toml = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
    assert _missing_keys(Config(), toml, "") == []


@pytest.mark.parametrize("body, needle", [
    ('[text_embeddings]\nlong_text = "chnk"\n', "text_embeddings.long_text must be one of truncate, chunk; got 'chnk'"),
    ('[models.lgbm]\nobjective = "hubr"\n', "models.lgbm.objective must be one of auto, huber, l1, l2; got 'hubr'"),
    ('[models]\nlearners = ["lgbm", 3]\n', "models.learners: expected a list of str, got 3"),
    ('[models.mlp]\nhidden = [64, "wide"]\n', "models.mlp.hidden: expected a list of int, got 'wide'"),
])
def test_bad_enum_values_fail_at_load(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(path)


def test_config_rejects_unknown_and_mistyped_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[folds]\nkk = 3\n")
    with pytest.raises(ConfigError, match="unknown key 'kk'"):
        load_config(path)
    path.write_text('[folds]\nk = "five"\n')
    with pytest.raises(ConfigError, match="expected int"):
        load_config(path)


@pytest.mark.parametrize(
    "query",
    ["EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{out}'", "EXPLAIN (ANALYZE) SELECT 1",
     "explain   analyse COPY (SELECT 1) TO '{out}'", "EXPLAIN COPY (SELECT 1) TO '{out}'"],
)
def test_explain_cannot_execute_a_write(built_store: Path, tmp_path: Path, query: str) -> None:
    """EXPLAIN ANALYZE executes its statement: before the fix this wrote the file and exited 0."""
    out = tmp_path / "x.csv"
    with pytest.raises(ReadOnlyViolation):
        run_query(FeatureStore(built_store), query.format(out=out))
    assert not out.exists()
    assert run_query(FeatureStore(built_store), "EXPLAIN SELECT count(*) FROM items").height >= 1


@pytest.mark.parametrize(
    "query",
    ["SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_text('/etc/hostname')",
     "SELECT * FROM read_blob('/etc/hostname')", "SELECT * FROM glob('/etc/*')",
     "SELECT * FROM read_parquet('{store}/tables/items.parquet')", "SELECT * FROM '/etc/passwd'"],
)
def test_sql_reaches_only_the_store_tables(built_store: Path, query: str) -> None:
    """Before the fix `sql` read any local file; now the connection has no file-system access at all."""
    with pytest.raises(Exception, match="(?i)permission|disabled|does not exist"):
        run_query(FeatureStore(built_store), query.format(store=built_store))
    result = _cli("sql", query.format(store=built_store), "--store", str(built_store))
    assert result.returncode == 1 and "root:" not in result.stdout


def test_sql_out_refuses_to_overwrite(built_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "rows.csv"
    out.write_text("keep me\n")
    result = _cli("sql", "SELECT * FROM items", "--store", str(built_store), "--out", str(out))
    assert result.returncode == 1 and "--force" in result.stderr and out.read_text() == "keep me\n"
    result = _cli("sql", "SELECT * FROM items", "--store", str(built_store), "--out", str(out), "--force")
    assert result.returncode == 0 and pl.read_csv(out).height == 50
    result = _cli("sql", "SELECT 1", "--store", str(built_store), "--out", str(tmp_path / "nope" / "x.parquet"))
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_the_loaded_config_is_frozen_and_edits_are_checked_again(tmp_path: Path) -> None:
    """What a command runs on is what was validated: assignment after load raises, naming the way to derive a
    config (`edited`), which runs every load-time check again."""
    from featurestore.config import edited

    config = load_config(None, {"store.dir": str(tmp_path)})
    with pytest.raises(dataclasses.FrozenInstanceError, match=r"cannot set FoldsConfig.k; derive a new one"):
        config.folds.k = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.text_sparse.fields[0].min_df = 0  # sections inside lists are frozen too
    with pytest.raises(ConfigError, match="folds.k is 2; expected at least 3"):
        edited(config, {"folds.k": 2})
    assert edited(config, {"folds.k": 4}).folds.k == 4 and config.folds.k == 5  # the original is untouched
