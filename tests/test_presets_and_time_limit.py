"""Presets (`--preset`, `preset = "..."`, `[presets.<name>]`) and the time limit (`--time-limit`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import optuna
import polars as pl
import pytest

from cli import main
from featurestore.budget import Budget, OverBudget
from featurestore.config import Config, edited
from featurestore.errors import ConfigError, UserError
from featurestore.store import FeatureStore
from pipeline.context import Context, open_config
from pipeline.run import train_learners, train_within
from stacking.meta import baseline_metas
from stacking.study import run_study
from tests.conftest import ROOT, make_config
from tests.test_audit_leaks_ids_integrity import _synthetic_inputs

DEFAULT = ROOT / "configs" / "default.toml"


# -- presets ---------------------------------------------------------------------------------------------------
def test_generic_presets_on_the_default_config() -> None:
    best = open_config(DEFAULT)
    fast = open_config(DEFAULT, {"preset": "fast"})
    medium = open_config(DEFAULT, {"preset": "medium"})
    assert best.preset == "best" and best.models.learners == ["lgbm", "xgb", "catboost", "mlp", "ridge", "lgbm_text",
                                                              "mlp_sparse"]
    # fast: no encoders, and their tables leave every learner; one MLP member; at most 20 candidates.
    assert fast.builders == ["items", "folds", "catalog", "target_enc", "text_sparse"]
    assert fast.models.learners == ["lgbm", "ridge", "mlp_sparse"]
    assert fast.models.sections["lgbm"]["tables"] == ["catalog", "target_enc"]
    assert fast.models.sections["mlp_sparse"]["members"] == 1
    assert fast.stacking.trials == 20
    # medium: the costliest learners out, the encoders kept.
    assert medium.models.learners == ["lgbm", "xgb", "mlp", "ridge", "mlp_sparse"]
    assert medium.builders == best.builders and medium.stacking.trials == 50


def test_fast_drops_a_variant_that_becomes_a_copy_and_flags_beat_the_preset(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[models]\nlearners = ["ridge", "ridge_knn", "xgb"]\n'
                    '[models.ridge]\ntables = ["catalog", "text_sparse"]\n'
                    '[models.ridge_knn]\nlearner = "ridge"\ntables = ["catalog", "text_sparse", "knn__text_minilm"]\n')
    fast = open_config(path, {"preset": "fast"})
    assert fast.models.learners == ["ridge"]  # ridge_knn without its kNN table is ridge; xgb is not a fast learner
    assert open_config(path, {"preset": "fast", "stacking.trials": 200}).stacking.trials == 200
    path.write_text(path.read_text().replace("[models]", 'preset = "fast"\n[models]'))
    assert open_config(path).models.learners == ["ridge"]  # the file's own choice
    assert open_config(path, {"preset": "best"}).models.learners == ["ridge", "ridge_knn", "xgb"]  # the flag's


def test_a_configs_own_preset_table_replaces_the_rules_and_is_checked_at_load(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[presets.fast]\nmodels.learners = ["ridge"]\nstacking.trials = 7\n'
                    '[presets.fast.models.ridge]\nalpha = 9.0\n')
    fast = open_config(path, {"preset": "fast"})
    assert fast.models.learners == ["ridge"] and fast.stacking.trials == 7
    assert fast.models.sections["ridge"]["alpha"] == 9.0
    assert fast.builders == open_config(path).builders  # the table said nothing of the encoders: kept
    path.write_text('[presets.medium]\nstacking.trails = 7\n')
    with pytest.raises(ConfigError, match=r"presets.medium.stacking: unknown key 'trails'"):
        open_config(path)  # checked although "best" is chosen
    path.write_text('[presets.quick]\nstacking.trials = 7\n')
    with pytest.raises(ConfigError, match="no preset of that name; presets are best, medium, fast"):
        open_config(path)
    with pytest.raises(ConfigError, match="preset must be one of best, medium, fast"):
        open_config(None, {"preset": "fastest"})
    with pytest.raises(ConfigError, match="chosen when the config loads"):
        edited(open_config(None), {"preset": "fast"})


def test_the_cli_runs_the_fast_preset_end_to_end_and_records_it(tmp_path: Path, real_train: pl.DataFrame,
                                                                 real_test: pl.DataFrame,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    real_train.head(120).write_parquet(tmp_path / "train.parquet")
    real_test.head(20).write_parquet(tmp_path / "test.parquet")
    args = ["--store", str(tmp_path / "s"), "--train", str(tmp_path / "train.parquet"), "--test",
            str(tmp_path / "test.parquet"), "-q"]
    assert main(["run", "--config", str(DEFAULT), "--preset", "fast", "--time-limit", "600", *args]) == 0
    out = capsys.readouterr().out
    assert "time limit 600 s (preset fast)" in out and "text_emb" not in out
    record = Context(DEFAULT, {"store.dir": str(tmp_path / "s"), "preset": "fast"}).record()
    assert record.preset == "fast" and record.time_limit_s == 600
    assert [s["learner"] for s in record.schedule] == ["lgbm", "ridge", "mlp_sparse"]
    assert {s["action"] for s in record.schedule} == {"trained"} and record.learners == ["lgbm", "ridge", "mlp_sparse"]
    assert pl.read_csv(tmp_path / "s" / "submission.csv").height == 20


# -- the time limit ----------------------------------------------------------------------------------------------
def test_a_budget_projects_the_rest_of_a_step_at_its_pace_so_far() -> None:
    budget = Budget(10.0, started=time.monotonic() - 8.0)  # ~2 s left
    budget.check_projection("x", 1, 5, 0.4)  # 1.6 s to go: fits
    with pytest.raises(OverBudget, match=r"x: stopped after 1 of 5 units"):
        budget.check_projection("x", 1, 5, 1.0)  # 4 s to go
    budget.check_projection("x", 5, 5, 100.0)  # finished: nothing to project


def _slow_toy_config(tmp_path: Path, real_train: pl.DataFrame, sleep_s: float, shrink: float = 1.0) -> Config:
    return make_config(tmp_path, real_train.head(40), None, **{
        "catalog.use_spacy": False, "folds.k": 4, "folds.price_bands": 4, "builders": ["items", "folds", "catalog"],
        "models.plugins": ["tests.toy_learner"], "models.learners": ["ridge", "toy"], "models.threads": 1,
        "models.ridge": {"tables": ["catalog"]}, "models.toy": {"tables": ["catalog"], "sleep_s": sleep_s,
                                                                "shrink": shrink},
        "stacking.raw_features": [], "stacking.trials": 4})


def test_a_learner_that_would_overrun_is_stopped_between_folds_and_the_stack_uses_what_finished(
        tmp_path: Path, real_train: pl.DataFrame) -> None:
    config = _slow_toy_config(tmp_path, real_train, sleep_s=1.0)  # 4 folds x 1 s
    ctx = Context(config, progress=False)
    ctx.build_features()
    store = FeatureStore(config.store.dir)
    built, decisions = train_within(config, store, Budget(2.5))
    assert [(d.learner, d.action) for d in decisions] == [("ridge", "trained"), ("toy", "stopped")]
    assert "toy: stopped after 1 of 4 units" in decisions[1].reason
    assert [b.table for b in built] == ["oof__ridge"] and store.info("oof__toy") is None  # nothing half-written
    record = ctx.stack(time_limit=12.5)  # the learners get 2.5 s of it, the stack 10 s (pipeline.run.STACK_SHARE)
    assert record.learners == ["ridge"] and record.base_cv.keys() == {"ridge"}
    assert [(s["learner"], s["action"]) for s in record.schedule] == [("ridge", "reused"), ("toy", "stopped")]
    # Control: with room, the same learner trains (the stop above is the budget's doing, not a failure).
    built, decisions = train_within(config, store, Budget(600.0))
    assert ("toy", "trained") in [(d.learner, d.action) for d in decisions]


def test_a_learner_whose_last_training_took_longer_than_what_is_left_is_skipped(
        tmp_path: Path, real_train: pl.DataFrame) -> None:
    config = _slow_toy_config(tmp_path, real_train, sleep_s=0.5)
    Context(config).build_features()
    store = FeatureStore(config.store.dir)
    train_learners(config, store, progress=False)  # toy: 4 x 0.5 s, recorded in the store
    slower = edited(config, {"models.toy.shrink": 3.0})  # stale: it would train again
    built, decisions = train_within(slower, store, Budget(1.0))
    assert [(d.learner, d.action) for d in decisions] == [("ridge", "reused"), ("toy", "skipped")]
    assert "its last training here took 2 s" in decisions[1].reason
    record = Context(slower).stack(time_limit=1.0 + 10.0)
    assert record.learners == ["ridge"] and record.time_limit_s == 11.0
    assert [s["action"] for s in record.schedule] == ["reused", "skipped"]
    run = json.loads(Path(record.run_record).read_text())
    assert run["schedule"][1]["learner"] == "toy" and run["schedule"][1]["action"] == "skipped"


def test_no_learner_finishing_is_one_clear_error(tmp_path: Path, real_train: pl.DataFrame) -> None:
    config = _slow_toy_config(tmp_path, real_train, sleep_s=1.0)
    config = edited(config, {"models.learners": ["toy"]})
    Context(config).build_features()
    with pytest.raises(UserError, match="no learner finished in time"):
        train_within(config, FeatureStore(config.store.dir), Budget(1.5))


def test_the_stack_study_stops_taking_candidates_at_its_deadline(tmp_path: Path) -> None:
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = open_config(None, {"stacking.metas": ["blend", "ridge"]})
    inputs = _synthetic_inputs()

    def storage() -> optuna.storages.JournalStorage:
        return optuna.storages.JournalStorage(JournalFileBackend(str(tmp_path / "j")))

    cut = run_study("s", inputs, config, 12, storage(), deadline=time.monotonic() - 1.0)
    assert sorted(cut) == list(range(len(baseline_metas())))  # the fallbacks only: always scored
    full = run_study("s", inputs, config, 12, storage())  # control: no deadline, the rest are evaluated
    assert sorted(full) == list(range(12))
    assert all(np.isfinite(s.final) for _, s in full.values())


def test_a_variant_is_expected_to_cost_what_its_learner_just_took(tmp_path: Path, real_train: pl.DataFrame) -> None:
    config = _slow_toy_config(tmp_path, real_train, sleep_s=0.4)  # toy: ~1.6 s for 4 folds
    config = edited(config, {"models.learners": ["ridge", "toy", "toy_2"],
                             "models.toy_2": {"learner": "toy", "shrink": 2.0}})
    Context(config).build_features()
    budget = Budget(3.5)  # ridge + toy fit (~2.2 s); toy_2 would need as long as toy took again (>= 1.6 s)
    built, decisions = train_within(config, FeatureStore(config.store.dir), budget)
    assert [(d.learner, d.action) for d in decisions] == [("ridge", "trained"), ("toy", "trained"),
                                                          ("toy_2", "skipped")]
    assert "toy, the same learner, took" in decisions[2].reason
    assert decisions[1].seconds >= 1.6  # a learner's own time is recorded (a stopped one's too)
