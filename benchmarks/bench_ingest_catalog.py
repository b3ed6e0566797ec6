"""Benchmark: ingest + folds + catalog features at scale, through the same builders the CLI runs.

Cases: the 54,806 real Mercari listings (+ their 31,789 unlabelled test rows, generic catalog format) and
75,000 train + 75,000 test rows resampled with replacement from the 832 real Amazon rows (fresh ids), with and
without spaCy NER. Each case runs in its own process so peak memory (ru_maxrss) is its own.
Results: benchmarks/results/ingest_catalog.json.

    python3 benchmarks/bench_ingest_catalog.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.facts import run_facts  # noqa: E402


def make_amazon_75k(shared: Path, out: Path) -> tuple[Path, Path]:
    import polars as pl

    src = ROOT / "data" / "sample"
    real = pl.concat([pl.read_parquet(src / "train.parquet"), pl.read_parquet(src / "test.parquet")],
                     how="diagonal_relaxed")
    labelled = real.filter(pl.col("price").is_not_null())
    train = labelled.sample(75_000, with_replacement=True, seed=0).with_columns(sample_id=pl.int_range(75_000))
    test = real.drop("price").sample(75_000, with_replacement=True, seed=1).with_columns(
        sample_id=pl.int_range(75_000, 150_000))
    train.write_csv(out / "train.csv")
    test.write_csv(out / "test.csv")
    return out / "train.csv", out / "test.csv"


def worker(config_path: str | None, overrides: dict) -> dict:
    from featurestore.builders import BuildContext, run_builders
    from featurestore.config import load_config
    from featurestore.store import FeatureStore
    from pipeline.registry import builders_for

    # Ingest + catalog features only (the configs' later builders, embeddings included, have their own benchmarks).
    config = load_config(config_path, {"builders": ["items", "folds", "catalog"], **overrides})
    store = FeatureStore(config.store.dir)
    timings = {}
    for name in config.builders:
        t0 = time.perf_counter()
        results = run_builders(BuildContext(store, config, progress=False), builders_for(config, [name]))
        timings[name] = {"seconds": round(time.perf_counter() - t0, 2), "rows": results[0].rows}
    rows = timings["items"]["rows"]
    total = sum(t["seconds"] for t in timings.values())
    return {
        "rows": rows,
        "seconds_total": round(total, 2),
        "rows_per_second": round(rows / total, 1),
        "stages": timings,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_case(name: str, config_path: str | None, overrides: dict) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.bench_ingest_catalog import worker;"
        f"print('RESULT' + json.dumps(worker({config_path!r}, {overrides!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"case {name} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[6:])
    print(f"{name}: {result['rows']} rows in {result['seconds_total']}s = {result['rows_per_second']} rows/s, "
          f"peak {result['peak_rss_mb']} MB", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ingest_catalog.json")
    args = parser.parse_args()
    results: dict = {**run_facts({"polars": "POLARS_MAX_THREADS unset: every core", "spacy": 1},
                                 "python3 benchmarks/bench_ingest_catalog.py " + " ".join(sys.argv[1:])),
                     "cases": {}}
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        mercari = args.shared / "mercari"
        results["cases"]["mercari_54806"] = run_case(
            "mercari_54806", str(ROOT / "configs" / "mercari.toml"),
            {"data.train": str(mercari / "train.parquet"), "data.test": str(mercari / "test_unlabelled.parquet"),
             "store.dir": str(tmp / "mercari")},
        )
        train_csv, test_csv = make_amazon_75k(args.shared, tmp)
        for spacy_on in (False, True):
            name = f"amazon_resampled_75k_csv_{'with' if spacy_on else 'no'}_spacy"
            results["cases"][name] = run_case(
                name, None,
                {"data.train": str(train_csv), "data.test": str(test_csv), "store.dir": str(tmp / name),
                 "catalog.use_spacy": spacy_on},
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
