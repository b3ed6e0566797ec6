"""Benchmark (issue 10, item 4): do MiniLM text embeddings + kNN neighbour prices help on Mercari?

Works in a hard-linked copy of the Mercari store that `bench_stack.py` trained and stacked: builds
`text_emb__minilm` (the default CPU backend, ONNX Runtime int8) and `knn__text_minilm` over all train + test
texts, adds the kNN table to the tables of the `--with-knn` learners (the others are reused as trained), retrains
those and re-runs `stack --trials N`, through the same pipeline functions the CLI calls. Compares CV SMAPE per
learner and for the stack with the store's own run on the same seller-grouped folds, and times every step.
Results: benchmarks/results/mercari_text_knn.json.

    python3 benchmarks/bench_mercari_text_knn.py [--trials 200] [--work /tmp/store_mercari_knn]
        [--with-knn lgbm ridge lgbm_text] [--keep-work]

--keep-work goes on in an existing work store (its embeddings and already-trained learners are reused by
fingerprint; the build seconds then cover only what was rebuilt).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.facts import run_facts  # noqa: E402
from featurestore.builders import BuildContext, run_builders  # noqa: E402
from featurestore.config import load_config  # noqa: E402
from featurestore.devices import threads  # noqa: E402
from featurestore.names import PREDICTIONS  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from models.train import TrainedLearner  # noqa: E402
from pipeline.registry import builders_for  # noqa: E402
from pipeline.run import train_and_stack  # noqa: E402

KNN = "knn__text_minilm"


def scores(store: FeatureStore, learners: list[str]) -> dict[str, float]:
    out = {name: TrainedLearner.of(store, name).oof_score for name in learners}
    record = store.info(PREDICTIONS).extra
    out.update(mean_blend=record["mean_blend_cv"], stack=record["stack_cv"], stack_meta=record.get("best_meta"))
    return out


def linked_copy(source: Path, target: Path) -> None:
    """Hard links for the immutable files (tables, models: always replaced by rename, never edited); real copies
    of the two files written in place (the DuckDB catalog, the Optuna journal)."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, copy_function=os.link)
    for name in ("features.duckdb", "optuna.journal"):
        if (target / name).exists():
            (target / name).unlink()
            shutil.copy2(source / name, target / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--base", type=Path, default=ROOT / "benchmarks/.stores/mercari",
                        help="the Mercari store bench_stack.py trained and stacked")
    parser.add_argument("--work", type=Path, default=Path("/tmp/store_mercari_knn"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/mercari_text_knn.json")
    parser.add_argument("--with-knn", nargs="+", default=["lgbm", "ridge", "lgbm_text"],
                        help="learners whose tables gain the kNN table")
    parser.add_argument("--keep-work", action="store_true", help="go on in an existing --work store")
    args = parser.parse_args()
    os.chdir(ROOT)
    base_config = load_config(ROOT / "configs/mercari.toml", {"store.dir": str(args.base)})
    base = FeatureStore(base_config.store.dir, create=False)
    learners = list(base_config.models.learners)
    before = scores(base, learners)
    print("store's own run", before, flush=True)

    if not (args.keep_work and args.work.exists()):
        linked_copy(base.root, args.work)
    tables = {name: list(getattr(base_config.models, name).tables) for name in args.with_knn}
    config = load_config(ROOT / "configs/mercari.toml", {
        "store.dir": str(args.work),
        "builders": [*base_config.builders, "text_emb", "knn"],
        "text_embeddings.models": ["minilm"],
        "knn.spaces": ["text_emb__minilm"], "knn.concat": [],
        **{f"models.{name}.tables": [*t, KNN] for name, t in tables.items()},
    })
    store = FeatureStore(config.store.dir)
    t0 = time.perf_counter()
    built = run_builders(BuildContext(store, config, progress=False), builders_for(config))
    build_s = time.perf_counter() - t0
    steps = {b.table: {"status": b.status, "seconds": round(b.seconds, 1)} for b in built}
    print("built", steps, flush=True)
    emb = store.info("text_emb__minilm")
    t0 = time.perf_counter()
    record = train_and_stack(config, store, trials=args.trials, progress=False)
    train_stack_s = time.perf_counter() - t0
    after = scores(store, learners)
    print("with minilm + knn", after, flush=True)
    result = {
        **run_facts({"every library": threads(config)},
                    "python3 benchmarks/bench_mercari_text_knn.py " + " ".join(sys.argv[1:])),
        "rows": store.read("items", columns=["sample_id"]).height,
        "text_backend": emb.params.get("backend"), "max_seq_length": emb.params.get("max_seq_length"),
        "build_seconds": round(build_s, 1), "steps": steps,
        "texts_per_s": round(emb.row_count / max(emb.seconds, 1e-9), 1),
        "train_and_stack_seconds": round(train_stack_s, 1), "trials": args.trials,
        "retrained_with_knn": sorted(tables),
        "cv_smape_before": before, "cv_smape_with_minilm_knn": after,
        "stack_gain": round(before["stack"] - after["stack"], 3),
        "stack_record_learners": record.base_cv,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
