"""AutoGluon-Tabular on an exported feature frame, cross-validated on the frame's own `fold` column.

Runs in the environment that has `autogluon.tabular` (the `bench` extra; its pins clash with this project's newer
scikit-learn/scipy, so benchmarks/bench_stack.py calls it through a separate interpreter). Imports nothing from
the project. Fold k is predicted by a predictor fitted on the other folds with time_limit = budget / k, the label
is log1p(price) with MAE (SMAPE's optimum sits near the median), and SMAPE is computed on prices.
`--holdout-fold K`: one fit on the other folds with time_limit = the whole budget, scored on fold K alone (the
issue's "same held-out sellers" form: at B/5 per fold, AutoGluon's fits overran 120 s by several times on 2 cores).

    python autogluon_cv.py --frame features.parquet --budget-s 600 --out result.json [--holdout-fold 0]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import pandas as pd


def smape(true: np.ndarray, pred: np.ndarray) -> float:
    denominator = np.abs(true) + np.abs(pred)
    return float(100 * np.mean(np.where(denominator > 0, 2 * np.abs(pred - true) / denominator, 0.0)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frame", required=True)
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--presets", default="medium_quality")
    parser.add_argument("--exclude", nargs="*", default=[],
                        help="model types left out (excluded_model_types), e.g. RF XT: those whose fits overran")
    parser.add_argument("--holdout-fold", type=int, default=None,
                        help="fit once without this fold (time_limit = the whole budget) and score this fold alone")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from autogluon.tabular import TabularPredictor
    from autogluon.tabular import __version__ as ag_version

    frame = pd.read_parquet(args.frame)
    frame = frame[frame["fold"] >= 0].reset_index(drop=True)
    price = frame["price"].to_numpy(dtype=float)
    features = frame.drop(columns=["sample_id", "split", "price", "fold"])
    features["log_price"] = np.log1p(price)
    folds = sorted(frame["fold"].unique().tolist())
    if args.holdout_fold is not None:
        if args.holdout_fold not in folds:
            raise SystemExit(f"--holdout-fold {args.holdout_fold}: the frame's folds are {folds}")
        folds = [args.holdout_fold]
    # CV: the budget split over the folds, so the whole CV fits in it; held-out: one fit with the whole budget.
    per_fit_s = args.budget_s if args.holdout_fold is not None else args.budget_s / len(folds)
    oof = np.full(len(frame), np.nan)
    per_fold = {}
    started = time.perf_counter()
    for k in folds:
        train, held = frame["fold"] != k, frame["fold"] == k
        with tempfile.TemporaryDirectory() as path:
            # verbosity 2: its progress ("Fitting model: X ...") in the log bench_budget keeps, so a run stopped
            # at the cap says which model it was in.
            predictor = TabularPredictor(label="log_price", eval_metric="mean_absolute_error", path=path,
                                         verbosity=2)
            predictor.fit(features[train], time_limit=per_fit_s, presets=args.presets,
                          excluded_model_types=args.exclude or None)
            oof[held.to_numpy()] = predictor.predict(features[held].drop(columns=["log_price"])).to_numpy()
            per_fold[int(k)] = {"smape": round(smape(price[held], np.expm1(oof[held.to_numpy()])), 4),
                                "best_model": predictor.model_best}
    result = {"autogluon_version": ag_version, "presets": args.presets, "excluded_model_types": args.exclude,
              "budget_s": args.budget_s,
              "seconds": round(time.perf_counter() - started, 1), "rows": len(frame),
              "n_features": features.shape[1] - 1, "folds": per_fold}
    if args.holdout_fold is None:
        result["cv_smape"] = round(smape(price, np.expm1(oof)), 4)
    else:
        held = (frame["fold"] == args.holdout_fold).to_numpy()
        result.update(holdout_fold=args.holdout_fold, holdout_rows=int(held.sum()), train_rows=int((~held).sum()),
                      time_limit_s=per_fit_s, holdout_smape=per_fold[args.holdout_fold]["smape"])
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
