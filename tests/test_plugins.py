"""A learner kept outside models/ arrives as one file plus one `[models.<name>]` section, and runs through
`train` and `stack` like the built-in ones; so does a feature builder (one file plus `[features.<name>]`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from featurestore.config import ConfigError, load_config
from models.contract import verify_learner
from models.registry import LEARNERS, learner_class, learner_settings, load_plugins, variant_base
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
    # Plus a variant of a built-in learner: its own section, its own oof table, stacked beside its base.
    # And a plug-in meta-learner (tests/toy_meta.py): one module named in models.plugins, picked in stacking.metas.
    # And a plug-in out-of-fold feature builder (tests/toy_builder.py) with its own section, read by the toy learner.
    config.write_text(FAST.replace('learners = ["toy", "ridge"]', 'learners = ["toy", "ridge", "ridge_strong"]')
                      .replace('"catalog"]\n[catalog]', '"catalog", "toy_len"]\n[catalog]')
                      .replace('[models.toy]\ntables = ["catalog"]', '[models.toy]\ntables = ["catalog", "toy_len"]')
                      .replace('plugins = ["tests.toy_learner"]', 'plugins = ["tests.toy_learner", "tests.toy_meta"]')
                      .replace("raw_features = []", 'raw_features = []\nmetas = ["toy_median", "blend"]')
                      + '[models.ridge_strong]\nlearner = "ridge"\nalpha = 300.0\n'
                      + '[features]\nplugins = ["tests.toy_builder"]\n[features.toy_len]\nbands = 3\n')
    common = ["--config", str(config), "--store", str(tmp_path / "s")]

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, *common, "-q"], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    cli("build-features", "--train", str(train), "--test", str(test))
    assert "oof__toy" in cli("train", "--learner", "toy")
    stacked = cli("stack", "--trials", "4")
    assert "toy" in stacked and "ridge_strong" in stacked and "stack" in stacked
    assert '"toy_median"' in (tmp_path / "s" / "optuna.journal").read_text()  # the plug-in meta was a candidate
    tables = tmp_path / "s" / "tables"
    ridge, strong = (pl.read_parquet(tables / f"oof__{n}.parquet") for n in ("ridge", "ridge_strong"))
    assert not np.allclose(ridge["pred"].to_numpy(), strong["pred"].to_numpy())  # alpha reached the variant
    from featurestore.store import FeatureStore

    assert FeatureStore(tmp_path / "s", create=False).info("toy_len").params["settings"] == {"bands": 3}
    toy_len = pl.read_parquet(tables / "toy_len.parquet")
    assert toy_len.height == 100 and toy_len["len_band_logp"].is_finite().all()
    oof = pl.read_parquet(tables / "oof__toy.parquet")
    assert oof.filter(pl.col("fold") >= 0)["pred"].is_finite().all() and oof.height == 100


def test_a_variant_copies_its_base_learners_section_and_is_validated(tmp_path: Path) -> None:
    """`[models.<name>] learner = "<base>"`: the base's resolved section, then the variant's own keys."""
    path = tmp_path / "c.toml"
    variant = '[models.ridge_strong]\nlearner = "ridge"\nalpha = 300.0\n'
    ridge = '[models.ridge]\ntables = ["catalog"]'
    path.write_text(FAST.replace(ridge, ridge + "\nclip = 2.0") + variant)
    config = load_config(path)
    load_plugins(config)
    settings = learner_settings(config, "ridge_strong")
    assert (settings.tables, settings.clip, settings.alpha) == (["catalog"], 2.0, 300.0)
    assert learner_settings(config, "ridge").alpha != 300.0  # the base's own section is untouched
    assert variant_base(config, "ridge_strong") == "ridge" and "ridge_strong" not in LEARNERS  # data, not a class
    assert learner_class("ridge_strong", config) is learner_class("ridge")
    verify_learner(learner_class("ridge_strong", config), settings)
    for text, message in ((variant.replace("alpha", "alhpa"), "models.ridge_strong: unknown key 'alhpa'"),
                          (variant.replace('"ridge"', '"rigde"'), r"learner = 'rigde': no learner of that name"),
                          ('[models.lgbm_text]\nlearner = "ridge"\n', "'lgbm_text' is already a registered learner"),
                          # Variants are the config's data: another config may make ridge_strong a variant of lgbm
                          # (no class from the first config lingers), and then `alpha` is not one of lgbm's keys.
                          (variant.replace('"ridge"', '"lgbm"'), "models.ridge_strong: unknown key 'alpha'")):
        path.write_text(FAST + text)
        with pytest.raises(ConfigError, match=message):
            broken = load_config(path)
            load_plugins(broken)
            learner_settings(broken, "ridge_strong")
    path.write_text(FAST.replace("shrink = 3.0", 'shrink = 3.0\nlearner = "ridge"'))  # a plug-in's own name
    with pytest.raises(ConfigError, match="'toy' is already a registered learner"):
        load_plugins(load_config(path))


def test_a_plugin_builders_section_and_name_are_checked_at_load(tmp_path: Path) -> None:
    """`[features.<name>]` is validated against the builder's settings, and a section or `builders` entry that no
    registered builder owns is refused with the known names, before anything runs."""
    import pipeline.registry  # noqa: F401  registers the load-time check

    path = tmp_path / "c.toml"
    plugin = '[features]\nplugins = ["tests.toy_builder"]\n'
    path.write_text(FAST + plugin + "[features.toy_len]\nbands = 1\n")
    with pytest.raises(ConfigError, match="features.toy_len.bands is 1; expected at least 2"):
        load_config(path)
    path.write_text(FAST + plugin + "[features.toy_lne]\nbands = 3\n")
    with pytest.raises(ConfigError, match=r"\[features.toy_lne\]: no registered builder .* \(those that do: toy_len\)"):
        load_config(path)
    path.write_text(FAST.replace('"catalog"]\n[catalog]', '"catalog", "toy_lne"]\n[catalog]'))
    with pytest.raises(ConfigError, match=r"builders: unknown feature builder\(s\) \['toy_lne'\]"):
        load_config(path)
    path.write_text(FAST + '[features]\nplugins = ["tests.no_such_module"]\n')
    with pytest.raises(ConfigError, match="features.plugins: cannot import 'tests.no_such_module'"):
        load_config(path)
