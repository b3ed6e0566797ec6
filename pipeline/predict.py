"""`python cli.py predict --input new.csv`: price new rows with the stored models and meta-learner.

The rows go through `pipeline.online.Predictor`, the one path that prices new rows (`Context.predict` and
`serve` use it too): the builders' online paths compute each new row's features as `build-features` computes a
test row's (kNN over the training rows, target encodings from the training rows' folds, the stored
vocabulary), then the stored fold models and meta-learner predict. Nothing is written but `out`. Ids that are
also training ids are refused: new rows must be new.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from featurestore.config import Config
from featurestore.store import FeatureStore
from pipeline.online import Predictor
from stacking.artifacts import write_submission


def predict_file(config: Config, store: FeatureStore, input_path: Path, out: Path, progress: bool = True
                 ) -> pl.DataFrame:
    predictions = Predictor(config, store).predict_file(input_path)
    ids = predictions["sample_id"].to_numpy()
    write_submission(out, ids, predictions["price"].to_numpy(), ids)
    return predictions
