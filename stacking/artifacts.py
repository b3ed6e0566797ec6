"""What a finished stack leaves: its study key, the meta-learner file (JSON, sha256 recorded and checked before
loading), the typed record `predict` reads, and the submission file."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import polars as pl

from featurestore.config import Config
from featurestore.errors import InputError
from featurestore.fingerprint import code_hash
from featurestore.names import (
    oof_table,
)
from featurestore.store import FeatureStore, atomic_write, verify_file
from stacking.inputs import StackInputs, make_meta
from stacking.levels import StackResult
from stacking.meta import MetaLearner
from stacking.record import StackRecord

log = logging.getLogger(__name__)


def _source_hash() -> str:
    """The code that fits and scores candidates: candidates scored by other code are never reused."""
    import stacking.inputs
    import stacking.levels
    import stacking.meta
    import stacking.study

    return code_hash((stacking.meta, stacking.inputs, stacking.study, stacking.levels, sys.modules[__name__]))


def stack_key(store: FeatureStore, config: Config) -> str:
    payload = {"oof": {n: store.info(oof_table(n)).fingerprint for n in config.models.learners},  # type: ignore[union-attr]
               "raw": config.stacking.raw_features, "metas": config.stacking.metas, "seed": config.stacking.seed,
               "nested": config.stacking.nested,
        # The meta-learners' and the study's code: candidates scored by older code are never reused.
        "code": _source_hash()}
    return "stack-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def load_stack_meta(store: FeatureStore, record: StackRecord, config: Config) -> tuple[MetaLearner, list[str]]:
    """The stack's final meta-learner and its feature names, its file checked against the recorded sha256."""
    path = store.root / record.meta_model
    verify_file(path, record.meta_sha256, "rerun `python cli.py stack` to refit the meta-learner")
    return load_meta(path, config)


def save_meta(path: Path, result: StackResult, inputs: StackInputs) -> None:
    payload = {"meta": result.final_name, "params": result.final_params, "n_base": inputs.n_base,
               "feature_names": inputs.feature_names, "state": result.final_meta.state()}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload)))


def load_meta(path: Path, config: Config) -> tuple[MetaLearner, list[str]]:
    payload = json.loads(path.read_text())
    meta = make_meta(payload["meta"], payload["params"], payload["n_base"], config.stacking.seed)
    meta.set_state(payload["state"])
    return meta, payload["feature_names"]


def check_submission(ids: np.ndarray, price: np.ndarray, expected_ids: np.ndarray) -> pl.DataFrame:
    submission = pl.DataFrame({"sample_id": ids, "price": price})
    if submission["sample_id"].n_unique() != submission.height or set(ids.tolist()) != set(expected_ids.tolist()):
        raise RuntimeError("submission ids do not match the test ids one to one")
    if not np.all(np.isfinite(price)) or np.any(price <= 0):
        raise InputError("submission has non-finite or non-positive prices; nothing was written")
    return submission


def write_submission(path: Path, ids: np.ndarray, price: np.ndarray, expected_ids: np.ndarray) -> pl.DataFrame:
    """The challenge format (sample_id,price): every test id exactly once, finite positive prices; CSV, or
    Parquet when `path` ends in .parquet."""
    submission = check_submission(ids, price, expected_ids)
    if path.suffix == ".parquet":
        atomic_write(path, lambda tmp: submission.write_parquet(tmp))
    else:
        atomic_write(path, lambda tmp: submission.write_csv(tmp))
    return submission
