"""Benchmark: quality per minute, side by side with AutoGluon-Tabular (issue 25).

For each budget (default 120, 600 and 1,800 s of end-to-end wall on this machine), from nothing:
- this product: `cli.py run --config configs/mercari.toml --preset P --time-limit B` into an empty store (P: fast
  at 120 s, medium at 600 s, best at 1,800 s), as a user would run it; its nested CV SMAPE (the stack scored on
  rows its tuning never saw), what the schedule did with each learner, wall and peak RSS (GNU time);
- AutoGluon-Tabular (benchmarks/autogluon_cv.py, its own virtualenv) on the raw Mercari columns (name,
  description, brand, category, condition, shipping) with time_limit = B over the same 5 seller-grouped folds
  (B/5 per fold, so the whole CV fits in B), label log1p(price) with MAE, SMAPE on prices. `--autogluon-holdout K`:
  instead, one AutoGluon fit on the other folds with time_limit = B, scored on fold K's sellers alone, compared
  with this product's nested out-of-fold stack prices on the same rows (`ours.fold_smape[K]`: its learners of
  those rows were fitted without fold K, and the stack's choice for them was made without fold K either).

    python3 -m venv /tmp/agvenv && /tmp/agvenv/bin/pip install 'autogluon.tabular[lightgbm,catboost,xgboost]'
    python3 benchmarks/bench_budget.py --autogluon-python /tmp/agvenv/bin/python [--budgets 120 600]

Results: benchmarks/results/budget.json, one entry per budget, each with its own run facts, written as each run
ends (`--budgets 1800` reruns one). AutoGluon's time_limit is a target, not a bound: a run past `--autogluon-cap` x
its budget is stopped and recorded without a score; `--autogluon-only --autogluon-cap 4` reruns AutoGluon alone for
an entry whose own run is already recorded (folds from `--folds-store`), keeping a late result with its wall, so a
score it reached only by overrunning is compared as such (it had more time than this product);
`--autogluon-exclude RF XT` runs it without the model types whose fits overran (entry autogluon_excluding_RF_XT,
beside the default run's). `ours_better`: this product's CV is lower than every AutoGluon score of that budget
(`ours_compared_with` names them); None when no AutoGluon run reached a score.
Time it on an otherwise idle machine: two OpenMP jobs at once slow each other 5-10x.
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
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_stack import timed_cli  # noqa: E402
from benchmarks.facts import run_facts  # noqa: E402
from featurestore.config import load_config  # noqa: E402
from models.metrics import smape  # noqa: E402

CONFIG = ROOT / "configs" / "mercari.toml"
PRESET_FOR = {120: "fast", 600: "medium", 1800: "best"}
RAW_COLUMNS = ("name", "item_description", "brand_name", "category_name", "item_condition_id", "shipping")
RESULTS = ROOT / "benchmarks" / "results" / "budget.json"


def ours(budget: int, preset: str, store: Path) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    wall, peak = timed_cli("run", "--config", str(CONFIG), "--store", str(store), "--preset", preset,
                           "--time-limit", str(budget))
    run = json.loads(max((store / "runs").glob("stack-*.json")).read_text())
    return {"preset": preset, "wall_seconds": wall, "within_limit": wall <= budget,
            "overrun_fraction": round(max(0.0, wall / budget - 1), 4), "peak_rss_mib": peak,
            "cv_smape": run["stack_cv"], "fold_smape": fold_smape(store), "nested": run["nested"],
            "best_single_cv": run["best_single_cv"],
            "base_cv": run["base_cv"], "learners": run["learners"], "schedule": run["schedule"],
            "candidates": run["candidates"], "stack_seconds": run["stack_seconds"],
            "learners_and_stack_seconds": run["total_seconds"]}


def fold_smape(store: Path) -> dict[str, float]:
    """SMAPE of the stack's nested out-of-fold prices, fold by fold (what a held-out comparison scores)."""
    config = load_config(CONFIG)
    truth = pl.read_parquet(ROOT / config.data.train).select(
        pl.col(config.columns.id).cast(pl.String).alias("sample_id"), pl.col(config.columns.target).alias("price"))
    oof = pl.read_parquet(store / "tables" / "stack_oof.parquet").with_columns(pl.col("sample_id").cast(pl.String))
    rows = oof.join(truth, on="sample_id", how="inner")
    if rows.height != oof.height:
        raise SystemExit(f"{store}: {oof.height - rows.height} stack_oof rows have no price in {config.data.train}")
    return {str(k): round(smape(part["price"].to_numpy(), part["pred_price"].to_numpy()), 4)
            for (k,), part in sorted(rows.partition_by("fold", as_dict=True).items())}


def raw_frame(store: Path, out: Path) -> int:
    """Mercari's raw columns with this product's folds (seller-grouped), as autogluon_cv.py reads them."""
    config = load_config(CONFIG)
    train = pl.read_parquet(ROOT / config.data.train)
    folds = pl.read_parquet(store / "tables" / "folds.parquet").select("sample_id", "fold")
    frame = (train.select(pl.col(config.columns.id).cast(pl.String).alias("sample_id"), *RAW_COLUMNS,
                          pl.col(config.columns.target).alias("price"))
             .join(folds.with_columns(pl.col("sample_id").cast(pl.String)), on="sample_id", how="inner")
             .with_columns(pl.lit("train").alias("split")))
    frame.write_parquet(out)
    return frame.height


def autogluon(python: str, budget: int, store: Path, cap: float, exclude: list[str], holdout: int | None) -> dict:
    """AutoGluon's CV (or its fold-`holdout` score) at `budget`; stopped (no score) when its wall passes `cap` x
    the budget: its time_limit is a target, not a bound (at 600 s its RandomForest fits ran past it on 2 cores)."""
    with tempfile.TemporaryDirectory() as tmp:
        frame_path, out = Path(tmp) / "raw.parquet", Path(tmp) / "autogluon.json"
        rows = raw_frame(store, frame_path)
        with (tempfile.NamedTemporaryFile("r", suffix=".time") as stats,
              tempfile.NamedTemporaryFile("w+", suffix=".log") as log):
            # Its own process group, killed whole at the cap: killing GNU time alone left AutoGluon running (an
            # orphan that took a core from the next run).
            process = subprocess.Popen(["/usr/bin/time", "-o", stats.name, "-f", "%e %M", python,
                                        str(ROOT / "benchmarks" / "autogluon_cv.py"), "--frame", str(frame_path),
                                        "--budget-s", str(budget), "--out", str(out),
                                        *(["--exclude", *exclude] if exclude else []),
                                        *(["--holdout-fold", str(holdout)] if holdout is not None else [])],
                                       stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                process.wait(timeout=cap * budget)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                fits = [line.strip() for line in Path(log.name).read_text().splitlines()
                        if line.startswith("Fitting model:") or "Training model for" in line]
                return {"stopped": f"no result after {cap:g} x its time_limit ({cap * budget:.0f} s wall)",
                        "fitting_when_stopped": fits[-1] if fits else None, "models_started": fits,
                        "excluded_model_types": exclude, "rows": rows, "columns": list(RAW_COLUMNS)}
            if process.returncode != 0:
                return {"error": Path(log.name).read_text()[-2000:]}
            wall, peak_kib = stats.read().strip().splitlines()[-1].split()
        ag = json.loads(out.read_text())
    return {**ag, "rows": rows, "wall_seconds": float(wall), "peak_rss_mib": round(float(peak_kib) / 1024, 1),
            "columns": list(RAW_COLUMNS)}


def comparison(ours_run: dict, ag: dict) -> dict | None:
    """This product's and AutoGluon's SMAPE on the same rows, or None when AutoGluon reached no score."""
    if ag.get("holdout_smape") is not None:
        fold = str(ag["holdout_fold"])
        return {"rows": f"fold {fold}", "ours": ours_run["fold_smape"][fold], "autogluon": ag["holdout_smape"]}
    if ag.get("cv_smape") is not None:
        return {"rows": "all folds (CV)", "ours": ours_run["cv_smape"], "autogluon": ag["cv_smape"]}
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", type=int, nargs="+", default=sorted(PRESET_FOR))
    parser.add_argument("--autogluon-python", default=None)
    parser.add_argument("--store-root", default=str(ROOT / "benchmarks" / ".stores" / "budget"))
    parser.add_argument("--autogluon-cap", type=float, default=1.5, help="stop AutoGluon after this x its budget")
    parser.add_argument("--autogluon-only", action="store_true",
                        help="keep the entry's recorded run of this product; run AutoGluon alone")
    parser.add_argument("--autogluon-exclude", nargs="*", default=[],
                        help="AutoGluon model types to leave out (e.g. RF XT, whose fits overran its time_limit on 2 "
                             "cores); recorded as its own entry, autogluon_excluding_<types>, beside the default run")
    parser.add_argument("--autogluon-holdout", type=int, default=None, metavar="K",
                        help="one AutoGluon fit with time_limit = the budget, scored on fold K alone (entry "
                             "autogluon_holdout_fold_K), compared with this product's stack on the same rows")
    parser.add_argument("--folds-store", default=None, help="the store whose folds AutoGluon uses "
                                                             "(default: the preset's store)")
    parser.add_argument("--preset", default=None, help="run this preset at every budget (entry <preset>@<budget>): "
                                                      "e.g. best at 600 s, where the time limit must cut")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["setup"] = ("Mercari 54,806 listings, 5 folds grouped by seller; this product: `run --preset P "
                        "--time-limit B` from an empty store; AutoGluon-Tabular: raw columns, same folds, "
                        "time_limit B/5 per fold; entries autogluon_holdout_fold_K: one AutoGluon fit on the other "
                        "folds with time_limit B, scored on fold K beside this product's nested OOF stack on fold K")
    for budget in args.budgets:
        preset = args.preset or PRESET_FOR.get(budget, "medium")
        key = str(budget) if args.preset is None else f"{preset}@{budget}"
        store = Path(args.store_root) / preset
        facts = run_facts({"ours": "models.threads = 0: every core", "autogluon": "its default: every core"},
                          " ".join(["python3", *sys.argv]))
        if args.autogluon_only:
            if key not in results or "ours" not in results[key]:
                raise SystemExit(f"--autogluon-only: {RESULTS} has no run of this product at {key}; run without it")
            if args.autogluon_holdout is not None and "fold_smape" not in results[key]["ours"]:
                raise SystemExit(f"--autogluon-holdout: {RESULTS}'s run of this product at {key} has no per-fold "
                                 "scores (recorded before they were); run without --autogluon-only")
            entry = results[key]
            entry["autogluon_facts"] = facts
        else:
            # Each entry is one run, with its own facts (an invocation may write one budget's entry alone).
            entry = {"facts": facts, "budget_seconds": budget, "ours": ours(budget, preset, store)}
            print(budget, "ours", entry["ours"]["cv_smape"], entry["ours"]["wall_seconds"], flush=True)
            results[key] = entry
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        if args.autogluon_python:
            folds_store = Path(args.folds_store) if args.folds_store else store
            name = ("autogluon" + (f"_holdout_fold_{args.autogluon_holdout}" if args.autogluon_holdout is not None
                                   else "")
                    + ("_excluding_" + "_".join(args.autogluon_exclude) if args.autogluon_exclude else ""))
            entry[name] = autogluon(args.autogluon_python, budget, folds_store, args.autogluon_cap,
                                    args.autogluon_exclude, args.autogluon_holdout)
            if "wall_seconds" in entry[name]:
                entry[name]["overrun_fraction"] = round(max(0.0, entry[name]["wall_seconds"] / budget - 1), 4)
            print(budget, name, entry[name].get("cv_smape"), flush=True)
            # Better than every AutoGluon run of this budget that reached a score (None: none did), each on its
            # own rows: CV against CV, a held-out fold against this product's score on that fold.
            pairs = {k: comparison(entry["ours"], v) for k, v in entry.items()
                     if k.startswith("autogluon") and not k.endswith("facts") and isinstance(v, dict)}
            scored = {k: v for k, v in pairs.items() if v is not None}
            entry["ours_better"] = all(v["ours"] < v["autogluon"] for v in scored.values()) if scored else None
            entry["ours_compared_with"] = scored
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
