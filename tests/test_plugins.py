"""A learner kept outside models/ arrives as one file plus one `[models.<name>]` section, and runs through
`train` and `stack` like the built-in ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from featurestore.config import ConfigError, load_config
from models.base import learner_settings
from models.contract import verify_learner
from models.registry import load_plugins
from tests.conftest import ROOT, SAMPLE

FAST = ('builders = ["items", "folds", "catalog"]\n[catalog]\nuse_spacy = false\n[folds]\nk = 4\nprice_bands = 4\n'
        '[models]\nlearners = ["toy", "ridge"]\nplugins = ["tests.toy_learner"]\nthreads = 1\n'
        '[models.ridge]\ntables = ["catalog"]\n[models.toy]\ntables = ["catalog"]\nshrink = 3.0\n'
        '[stacking]\nraw_features = []\n')


def test_a_plugin_learner_meets_the_contract_and_its_section_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(FAST)
    config = load_config(path)
    load_plugins(config)
    from tests.toy_learner import ToyLearner, ToySettings

    assert learner_settings(config, "toy") == ToySettings(tables=["catalog"], shrink=3.0)
    verify_learner(ToyLearner, ToySettings())
    path.write_text(FAST.replace("shrink = 3.0", 'shrink = "lots"'))
    with pytest.raises(ConfigError, match="models.toy.shrink: expected float"):
        learner_settings(load_config(path), "toy")
    path.write_text(FAST + "[models.tyo]\ntables = []\n")
    with pytest.raises(ConfigError, match=r"\[models.tyo\]: no learner of that name"):
        load_plugins(load_config(path))


def test_a_plugin_learner_trains_and_stacks_through_the_cli(tmp_path: Path) -> None:
    train = tmp_path / "train.parquet"
    test = tmp_path / "test.parquet"
    pl.read_parquet(SAMPLE / "train.parquet").head(80).write_parquet(train)
    pl.read_parquet(SAMPLE / "test.parquet").head(20).write_parquet(test)
    config = tmp_path / "c.toml"
    config.write_text(FAST)
    common = ["--config", str(config), "--store", str(tmp_path / "s")]

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, *common, "-q"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    cli("build-features", "--train", str(train), "--test", str(test))
    assert "oof__toy" in cli("train", "--learner", "toy")
    stacked = cli("stack", "--trials", "3")
    assert "toy" in stacked and "stack" in stacked
    oof = pl.read_parquet(tmp_path / "s" / "tables" / "oof__toy.parquet")
    assert oof.filter(pl.col("fold") >= 0)["pred"].is_finite().all() and oof.height == 100
