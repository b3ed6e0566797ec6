"""Benchmark (issue 14, CPU part): the fine-tuned transformer regressor on a few hundred real Mercari rows.

Takes the first `--rows` labelled Mercari listings (whole sellers kept together by the folds), builds the store
with the Mercari config's builders, and cross-fits `finetune` (MiniLM, per-fold early stopping) beside `ridge` on
the field-aware sparse text, through the pipeline functions the CLI calls. Records OOF SMAPE, wall per fold and
the device. The scale run (55k rows, 5 folds) needs a GPU. Results: benchmarks/results/finetune_cpu.json.

    python3 benchmarks/bench_finetune.py [--rows 400] [--epochs 3] [--max-seq-length 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from benchmarks.facts import run_facts  # noqa: E402
from featurestore.builders import BuildContext, run_builders  # noqa: E402
from featurestore.config import load_config  # noqa: E402
from featurestore.devices import threads  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from models.metrics import smape  # noqa: E402
from models.train import TrainedLearner, learner_builders  # noqa: E402
from pipeline.registry import builders_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/finetune_cpu.json")
    args = parser.parse_args()
    import torch

    train = pl.read_parquet(ROOT.parent / "shared/data/mercari/train.parquet").head(args.rows)
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        train.write_parquet(tmp / "train.parquet")
        config = load_config(ROOT / "configs/mercari.toml", {
            "data.train": str(tmp / "train.parquet"), "data.test": "", "store.dir": str(tmp / "store"),
            "models.learners": ["ridge", "finetune"],
            "models.finetune.epochs": args.epochs, "models.finetune.max_seq_length": args.max_seq_length,
            "models.finetune.batch_size": 16,
        })
        store = FeatureStore(config.store.dir)
        run_builders(BuildContext(store, config, progress=False), builders_for(config))
        results: dict = {**run_facts({"torch": threads(config)},
                                     "python3 benchmarks/bench_finetune.py " + " ".join(sys.argv[1:])),
                         "rows": train.height, "folds": config.folds.k,
                         "device": "cuda" if torch.cuda.is_available() else "cpu",
                         "epochs": args.epochs, "max_seq_length": args.max_seq_length, "learners": {}}
        price = store.read("items", columns=["sample_id", "price"]).sort("sample_id")["price"].to_numpy()
        results["median_baseline_smape"] = round(smape(price, np.full(len(price), np.median(price))), 2)
        for builder in learner_builders(config):
            t0 = time.perf_counter()
            run_builders(BuildContext(store, config, progress=False), [builder])
            record = TrainedLearner.of(store, builder.name)
            results["learners"][builder.name] = {
                "oof_smape": record.oof_score, "wall_s": round(time.perf_counter() - t0, 1),
                "fold_seconds": record.fold_seconds, "best_iterations": record.best_iterations}
            print(builder.name, results["learners"][builder.name], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
