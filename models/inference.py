"""Inference with stored fold models: what `predict` runs on a store derived for new rows.

Test-row predictions of a trained learner's fold models (trained in one store) on the feature tables of another:
the same matrix code, the same files (each checked against its recorded sha256 first), the same fold order and
averaging as training, so `predict` reproduces the pipeline's own test predictions bit for bit.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import polars as pl

from featurestore.config import Config
from featurestore.folds import FoldMean
from featurestore.store import FeatureStore
from models.matrix import MatrixSpec, feature_inputs, item_texts, load_frame
from models.metrics import to_price
from models.registry import learner_class
from models.train import SPEC_FILE, TrainedLearner, make_learner, task_target


def predict_saved(features: FeatureStore, models: FeatureStore, config: Config, name: str) -> pl.DataFrame:
    """Test-row predictions of the stored fold models of `name` (trained in `models`) on the feature tables of
    `features`: the same matrix code, the same files, the same fold order and averaging as training."""
    trained = TrainedLearner.of(models, name)
    trained.verify(models, f"retrain it: `python cli.py train --learner {name} --force`")
    model_dir = models.root / trained.model_dir
    spec = MatrixSpec.load(model_dir / SPEC_FILE)
    frame = load_frame(features, spec.tables).filter(pl.col("split") == "test")
    x = feature_inputs(features, spec, frame)
    if learner_class(name, config).reads_text:
        x = replace(x, text=item_texts(features, frame))
    folds = trained.folds
    make = make_learner(config, name, spec)
    mean = FoldMean(frame.height)
    for k in folds:
        learner = make(k)
        learner.load(model_dir / learner.file_pattern.format(fold=k))
        mean.add(learner.predict(x))
    output = mean.mean()
    price_pred = to_price(output, task_target(config))
    return frame.select("sample_id").with_columns(
        pl.Series("pred", output), pl.Series("pred_log", np.log1p(price_pred)), pl.Series("pred_price", price_pred))
