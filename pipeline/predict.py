"""`python cli.py predict --input new.csv`: price new rows with the stored models and meta-learner.

The new rows go through the very builders `build-features` runs (same code, same config): a prediction store
`<store>/predict/<file>-<hash>/` is built with the training file as train and the new file as test, reusing the
training store's embeddings for unchanged rows. Its test rows then get exactly the features a test row gets in
training (kNN over all training rows, target encodings from all training rows), and the stored fold models and
meta-learner predict them. Ids that are also training ids are refused by ingest: new rows must be new.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl

from featurestore.builders import BuildContext, run_builders
from featurestore.config import Config, edited
from featurestore.errors import StaleTable
from featurestore.names import FOLDS, PREDICTIONS, oof_table
from featurestore.store import FeatureStore, Timer, file_sha256
from models.inference import predict_saved
from models.matrix import MatrixSpec
from models.train import SPEC_FILE, TrainedLearner, learner_builders
from pipeline.registry import builders_for, config_as_built, require_fresh
from stacking.artifacts import load_stack_meta, stack_key, write_submission
from stacking.inputs import meta_frame
from stacking.record import StackRecord


def prediction_store_dir(store: FeatureStore, input_path: Path) -> Path:
    return store.derived_dir(f"{input_path.stem}-{file_sha256(input_path)[:12]}")


def _check_same_settings(trained: FeatureStore, derived: FeatureStore, tables: set[str]) -> None:
    for table in sorted(tables):
        old, new = trained.info(table), derived.info(table)
        if old is None or new is None:
            raise StaleTable(f"table {table} is missing from {'the training' if old is None else 'the prediction'} "
                               "store")
        if old.params != new.params:
            raise StaleTable(f"table {table} was built with {old.params} for training but {new.params} now; "
                               "rerun `python cli.py stack` with this config")


def _check_same_folds(trained: FeatureStore, derived: FeatureStore) -> None:
    """The fold plan is the training store's, by content: new rows must not move a training row to another fold
    (every kNN statistic, target encoding and fold model of that row would change)."""
    old, new = trained.read(FOLDS).sort("sample_id"), derived.read(FOLDS).sort("sample_id")
    if not old.equals(new):
        raise StaleTable(f"the prediction store at {derived.root} drew other folds than the training store "
                         f"{trained.root}; rerun `python cli.py build-features && python cli.py stack`")


def _tables_used(store: FeatureStore, learners: list[str], raw_features: list[str]) -> set[str]:
    used = {f.partition(".")[0] for f in raw_features}
    for name in learners:
        model_dir = store.root / TrainedLearner.of(store, name).model_dir
        used |= set(MatrixSpec.load(model_dir / SPEC_FILE).tables)
    return used


def _require_current_stack(config: Config, store: FeatureStore, trained: StackRecord) -> None:
    """The stored stack must still match what it was trained from: the train file, the feature tables, the
    learners and the stacking settings. Otherwise its predictions would silently mix old models with new data."""
    fix = "python cli.py build-features && python cli.py stack"
    tables = _tables_used(store, trained.learners, trained.raw_features) | {oof_table(n) for n in trained.learners}
    require_fresh(config, store, tables, learner_builders(config, trained.learners), fix=fix)
    if stack_key(store, config) != trained.study_key:
        raise StaleTable(f"the stack in {store.root} was tuned on other learner tables or stacking settings than "
                         f"the store and config hold now (learners retrained, or [stacking] changed); run `{fix}`")


def predict_file(config: Config, store: FeatureStore, input_path: Path, out: Path, progress: bool = True
                 ) -> pl.DataFrame:
    trained = StackRecord.of(store)
    learners, raw_features = trained.learners, trained.raw_features
    _require_current_stack(config, store, trained)
    derived_dir = prediction_store_dir(store, input_path)
    derived_config = edited(config_as_built(config, store), {"data.test": str(input_path),
                                                             "store.dir": str(derived_dir)})
    created = not derived_dir.exists()
    derived = FeatureStore(derived_dir)
    with Timer() as timer:
        try:
            run_builders(BuildContext(derived, derived_config, progress=progress, parent=store),
                         builders_for(derived_config))
        except BaseException:
            if created:  # a rejected input leaves nothing behind (a kept store would only serve a rerun)
                shutil.rmtree(derived_dir, ignore_errors=True)
            raise
        _check_same_settings(store, derived, _tables_used(store, learners, raw_features))
        _check_same_folds(store, derived)
        frame = meta_frame(derived, [], raw_features).filter(pl.col("split") == "test").select(
            "sample_id", *raw_features)
        for name in learners:
            base = predict_saved(derived, store, config, name).select("sample_id", pl.col("pred_log").alias(name))
            frame = frame.join(base, on="sample_id", how="left", maintain_order="left")
        meta, feature_names = load_stack_meta(store, trained, config)
        x = frame.select(pl.col(feature_names).cast(pl.Float64)).to_numpy()
        price = np.clip(np.expm1(meta.predict(x)), 0.01, None)
    ids = frame["sample_id"].to_numpy()
    predictions = pl.DataFrame({"sample_id": ids, "price": price})
    derived.write(PREDICTIONS, predictions, builder="Predictor",
                  params={"input": str(input_path), "models": str(store.root)}, fingerprint=file_sha256(input_path),
                  seconds=timer.seconds, extra={"meta_model": trained.meta_model})
    write_submission(out, ids, price, ids)
    return predictions
