"""Benchmark: CV SMAPE of every base learner, the mean blend, the best single learner and the stack, on the
Mercari corpus (54,806 real listings, folds grouped by seller) and on the 632 real Amazon rows. In one run:
each base learner trained from scratch (`train --learner X`: wall seconds, peak RSS), then `stack --trials N`
with the learners already trained (wall seconds, peak RSS), then the same `stack` killed with SIGKILL mid-study
and rerun: it must resume and end with the uninterrupted run's predictions bit for bit. Optionally, side by side,
AutoGluon-Tabular on the same feature tables (the GBDTs' `tables`), folds and time budget.

Everything runs through the CLI as a user would. AutoGluon needs the `bench` extra, whose pins clash with this
project's newer scikit-learn/scipy, so it runs in its own environment:

    python3 -m venv /tmp/agvenv && /tmp/agvenv/bin/pip install 'autogluon.tabular[lightgbm,catboost,xgboost]' polars
    python3 benchmarks/bench_stack.py --trials 200 --autogluon-python /tmp/agvenv/bin/python \
        [--amazon-from store]   # copy feature tables of an existing default-config store (skips re-embedding)

Results: benchmarks/results/stack.json (an entry per corpus; `--only` replaces that corpus's entry alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.facts import run_facts  # noqa: E402
from featurestore.config import load_config  # noqa: E402
from featurestore.devices import threads  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from models.matrix import load_frame  # noqa: E402
from models.registry import learner_settings  # noqa: E402

STORES = ROOT / "benchmarks" / ".stores"
MODEL_OUTPUTS = ("models", "runs", "predict", "optuna.journal", "submission.csv", "report.html")


def cli(*args: str) -> float:
    return timed_cli(*args)[0]


def timed_cli(*args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the command and its worker processes) via GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as stats:
        started = time.perf_counter()
        result = subprocess.run(["/usr/bin/time", "-o", stats.name, "-f", "%M", sys.executable, str(ROOT / "cli.py"),
                                 *args, "-q"], cwd=ROOT, capture_output=True, text=True)
        wall = round(time.perf_counter() - started, 1)
        if result.returncode != 0:
            raise RuntimeError(f"cli {' '.join(args)} failed:\n{result.stderr[-4000:]}")
        peak_kib = float(stats.read().strip().splitlines()[-1])
    return wall, round(peak_kib / 1024, 1)


def finished_trials(journal: Path) -> int:
    if not journal.is_file():
        return 0
    return sum('"op_code":6' in line.replace(" ", "") for line in journal.read_text().splitlines())


def kill_and_resume(common: list[str], trials: int, store_dir: Path, kill_after: int) -> dict:
    """Start `stack` on a fresh journal, SIGKILL its whole process group once `kill_after` candidates are told,
    rerun it, and compare its predictions with the uninterrupted run's."""
    clean = pl.read_parquet(store_dir / "tables" / "predictions.parquet")
    clean_oof = pl.read_parquet(store_dir / "tables" / "stack_oof.parquet")
    journal = store_dir / "optuna.journal"
    journal.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "stack", *common, "--trials", str(trials), "-q"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while process.poll() is None and finished_trials(journal) < kill_after:
        time.sleep(0.2)
    killed_at = finished_trials(journal)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resume_s = cli("stack", *common, "--trials", str(trials))
    resumed = pl.read_parquet(store_dir / "tables" / "predictions.parquet")
    resumed_oof = pl.read_parquet(store_dir / "tables" / "stack_oof.parquet")
    return {"killed_after_candidates": killed_at, "killed": process.returncode == -signal.SIGKILL,
            "resume_wall_seconds": resume_s, "identical_predictions": resumed.equals(clean),
            "identical_stack_oof": resumed_oof.equals(clean_oof)}


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
    frame = load_frame(FeatureStore(store_dir), learner_settings(config, "lgbm").tables)
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
    common = ["--config", str(config_path), "--store", str(store_dir)]
    config = load_config(config_path, {"store.dir": str(store_dir)})
    facts = run_facts({"every command": f"models.threads = {config.models.threads} -> {threads(config)} threads"},
                      "python3 benchmarks/bench_stack.py " + " ".join(sys.argv[1:]))
    if copy_from is not None:
        shutil.rmtree(store_dir, ignore_errors=True)
        shutil.copytree(copy_from, store_dir)
        FeatureStore(store_dir).refresh_views()
    features_s, features_peak = timed_cli("build-features", *common)
    reset_models(store_dir)
    learners: dict[str, dict] = {}
    for learner in config.models.learners:
        learners[learner] = train_learner(common, store_dir, learner)
        print(name, learner, learners[learner], flush=True)
    out = {**facts, **stack_part(name, config_path, store_dir, trials, learners,
                                 {"build_features_seconds": features_s, "build_features_peak_rss_mib": features_peak})}
    if ag_python:
        out["autogluon"] = autogluon(ag_python, store_dir, config_path, out["stack_wall_seconds_learners_trained"])
        print(name, "autogluon", json.dumps(out["autogluon"]), flush=True)
    return out


def train_learner(common: list[str], store_dir: Path, learner: str) -> dict:
    wall, peak = timed_cli("train", *common, "--learner", learner)
    extra = FeatureStore(store_dir).info(f"oof__{learner}").extra  # type: ignore[union-attr]
    return {"cv_smape": extra["oof_score"], "train_wall_seconds": wall, "peak_rss_mib": peak}


def stack_part(name: str, config_path: Path, store_dir: Path, trials: int, learners: dict, earlier: dict) -> dict:
    common = ["--config", str(config_path), "--store", str(store_dir)]
    (store_dir / "optuna.journal").unlink(missing_ok=True)  # every candidate evaluated in this measurement
    base_wall = round(sum(v["train_wall_seconds"] for v in learners.values()), 1)
    stack_s, stack_peak = timed_cli("stack", *common, "--trials", str(trials))
    record = json.loads(sorted((store_dir / "runs").glob("stack-*.json"))[-1].read_text())
    out = {"config": str(config_path.relative_to(ROOT)), "train_rows": record["train_rows"],
           "test_rows": record["test_rows"], "trials": trials, "stack_workers": record["workers"],
           "build_features_seconds": earlier["build_features_seconds"],
           "build_features_peak_rss_mib": earlier["build_features_peak_rss_mib"],
           "base_learners": learners, "base_learners_train_wall_seconds": base_wall,
           "stack_wall_seconds_learners_trained": stack_s, "stack_peak_rss_mib": stack_peak,
           "stack_over_base_wall": round(stack_s / base_wall, 3),
           "stack_seconds_in_study": record["stack_seconds"], "candidates": record["candidates"],
           "base_cv_smape": record["base_cv"], "mean_blend_cv_smape": record["mean_blend_cv"],
           "best_single_cv_smape": record["best_single_cv"], "best_constant_cv_smape": record["best_constant_cv"],
           "stack_cv_smape": record["stack_cv"], "selection": [record["selection"], record["selection_se"]],
           "stack_not_worse_than_best_single": record["stack_cv"] <= record["best_single_cv"],
           "stack_not_worse_than_best_constant": record["stack_cv"] <= record["best_constant_cv"],
           "stack_final_choice_cv_smape": record["final_cv"], "stack_meta": record["best_meta"],
           "stack_params": record["best_params"], "nested": record["nested"],
           "outer_fold_choices": {k: v["meta"] for k, v in record["outer_folds"].items()},
           "outer_fold_lowest_inner_cv": {k: v["lowest_inner_cv_meta"] for k, v in record["outer_folds"].items()}}
    print(name, json.dumps(out), flush=True)
    out["kill_9_resume"] = kill_and_resume(common, trials, store_dir, kill_after=max(2, trials // 3))
    print(name, "kill -9", json.dumps(out["kill_9_resume"]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--autogluon-python", default=None, help="interpreter with autogluon.tabular installed")
    parser.add_argument("--amazon-from", type=Path, default=None, help="existing default-config store to copy")
    parser.add_argument("--only", choices=["mercari", "amazon"], default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stack.json")
    args = parser.parse_args()
    # Entries of other corpora stay (each is its own run, with its own facts); the one measured here is replaced.
    earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = {k: v for k, v in earlier.items() if k in ("mercari", "amazon_632")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "mercari"):
        results["mercari"] = corpus("mercari", ROOT / "configs/mercari.toml", STORES / "mercari", args.trials,
                                    args.autogluon_python, None)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.only in (None, "amazon"):
        results["amazon_632"] = corpus("amazon", ROOT / "configs/default.toml", STORES / "amazon", args.trials,
                                       args.autogluon_python, args.amazon_from)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
