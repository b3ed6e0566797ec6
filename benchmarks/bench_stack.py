"""Benchmark: CV SMAPE of every base learner, the mean blend and the stack, on the Mercari corpus (54,806 real
listings, folds grouped by seller) and on the 632 real Amazon rows; wall time of `stack --trials N` (base
learners trained from scratch + the Optuna studies); and, side by side in the same run, AutoGluon-Tabular on the
same feature tables (the GBDTs' `tables`), the same folds and the same time budget (our stack's wall time).

Everything runs through the CLI as a user would. AutoGluon needs the `bench` extra, whose pins clash with this
project's newer scikit-learn/scipy, so it runs in its own environment:

    python3 -m venv /tmp/agvenv && /tmp/agvenv/bin/pip install 'autogluon.tabular[lightgbm,catboost,xgboost]' polars
    python3 benchmarks/bench_stack.py --trials 200 --autogluon-python /tmp/agvenv/bin/python \
        [--amazon-from store]   # copy feature tables of an existing default-config store (skips re-embedding)

Results: benchmarks/results/stack.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featurestore.config import load_config  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from models.matrix import load_frame  # noqa: E402

STORES = ROOT / "benchmarks" / ".stores"
MODEL_OUTPUTS = ("models", "runs", "predict", "optuna.journal", "submission.csv", "report.html")


def cli(*args: str) -> float:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args, "-q"], cwd=ROOT, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise RuntimeError(f"cli {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return round(time.perf_counter() - started, 1)


def reset_models(store_dir: Path) -> None:
    """Keep the feature tables, drop everything learned, so `stack` trains from scratch."""
    for name in MODEL_OUTPUTS:
        path = store_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for table in store_dir.glob("tables/*.parquet"):
        if table.name.startswith(("oof__", "stack_oof", "predictions")):
            table.unlink()


def autogluon(python: str, store_dir: Path, config_path: Path, budget_s: float) -> dict:
    config = load_config(config_path, {"store.dir": str(store_dir)})
    frame = load_frame(FeatureStore(store_dir), config.models.lgbm.tables)
    with tempfile.TemporaryDirectory() as tmp:
        frame.write_parquet(Path(tmp) / "features.parquet")
        out = Path(tmp) / "autogluon.json"
        result = subprocess.run([python, str(ROOT / "benchmarks" / "autogluon_cv.py"), "--frame",
                                 str(Path(tmp) / "features.parquet"), "--budget-s", str(budget_s), "--out", str(out)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return {"error": result.stderr[-2000:]}
        return json.loads(out.read_text())


def corpus(name: str, config_path: Path, store_dir: Path, trials: int, ag_python: str | None,
           copy_from: Path | None) -> dict:
    if copy_from is not None:
        shutil.rmtree(store_dir, ignore_errors=True)
        shutil.copytree(copy_from, store_dir)
        FeatureStore(store_dir).refresh_views()
    common = ["--config", str(config_path), "--store", str(store_dir)]
    features_s = cli("build-features", *common)
    reset_models(store_dir)
    stack_s = cli("stack", *common, "--trials", str(trials))
    record = json.loads(sorted((store_dir / "runs").glob("stack-*.json"))[-1].read_text())
    out = {"config": str(config_path.relative_to(ROOT)), "train_rows": record["train_rows"],
           "test_rows": record["test_rows"], "trials": trials, "build_features_seconds": features_s,
           "stack_wall_seconds": stack_s, "base_cv_smape": record["base_cv_smape"],
           "base_learner_seconds": {k: v["seconds"] for k, v in record["base_learners"].items()},
           "mean_blend_cv_smape": record["mean_blend_cv_smape"], "stack_cv_smape": record["stack_cv_smape"],
           "stack_meta": record["best_meta"], "stack_params": record["best_params"],
           "stack_seconds_optuna": record["stack_seconds"], "nested": record["nested"]}
    print(name, json.dumps(out), flush=True)
    if ag_python:
        out["autogluon"] = autogluon(ag_python, store_dir, config_path, stack_s)
        print(name, "autogluon", json.dumps(out["autogluon"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--autogluon-python", default=None, help="interpreter with autogluon.tabular installed")
    parser.add_argument("--amazon-from", type=Path, default=None, help="existing default-config store to copy")
    parser.add_argument("--only", choices=["mercari", "amazon"], default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stack.json")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results["cpus"] = __import__("os").cpu_count()
    if args.only in (None, "mercari"):
        results["mercari"] = corpus("mercari", ROOT / "configs/mercari.toml", STORES / "mercari", args.trials,
                                    args.autogluon_python, None)
    if args.only in (None, "amazon"):
        results["amazon_632"] = corpus("amazon", ROOT / "configs/default.toml", STORES / "amazon", args.trials,
                                       args.autogluon_python, args.amazon_from)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
