"""Benchmark: wall time of the out-of-fold kNN feature job at the challenge's scale (75k train + 75k test rows)
at 384 (MiniLM) and 768 (MPNet) dimensions, on this machine's cores, exact inner-product search (the default).

Vectors: 150k real-scale embeddings cannot be encoded on 2 CPU cores in a benchmark's time (MiniLM runs at about
57 texts/s here), so the vectors are synthetic: 2,000 Gaussian cluster centres plus noise, L2-normalised. Exact
flat search costs the same whatever the values are; prices are drawn from the real Mercari price column (same
distribution as the Amazon file) and 2% of rows are exact text duplicates, so the duplicate-exclusion path runs.
The timed span is `features.knn.knn_features`, the function the `knn__*` builders call (5 folds + the test rows).

    python3 benchmarks/bench_knn.py [--train 75000] [--test 75000] [--dims 384 768]
Results: benchmarks/results/knn.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from benchmarks.facts import run_facts  # noqa: E402
from features.knn import knn_features, search  # noqa: E402

MERCARI = ROOT.parent / "shared" / "data" / "mercari" / "train.parquet"


def synthetic_vectors(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((2000, dim)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.7 * rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors)


def case(n_train: int, n_test: int, dim: int, folds: int, ks: list[int], seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    vectors = synthetic_vectors(n, dim, rng)
    prices = pl.read_parquet(MERCARI, columns=["price"])["price"].to_numpy()
    log_price = np.log1p(rng.choice(prices, n))
    fold = np.concatenate([rng.integers(0, folds, n_train), np.full(n_test, -1)])
    ids = np.arange(n, dtype=np.int64)
    text_key = np.array([f"text-{i}" for i in range(n)], dtype=object)
    dup = rng.choice(n, size=n // 50, replace=False)
    text_key[dup] = text_key[rng.choice(n, size=len(dup))]  # 2% exact duplicates, across folds and train/test
    log_price[fold == -1] = np.nan  # test rows are unlabelled

    t0 = time.perf_counter()
    search(vectors[:n_train], vectors[n_train:], max(ks) + 16)
    search_only = time.perf_counter() - t0

    t0 = time.perf_counter()
    columns = knn_features(ids, vectors, log_price, fold, [text_key], ks, "bench")
    total = time.perf_counter() - t0
    assert all(np.isfinite(columns["bench_k20_median"][: n_train + n_test])), "every row should get neighbours"
    return {"train_rows": n_train, "test_rows": n_test, "dim": dim, "folds": folds, "ks": ks,
            "seconds_total": round(total, 1), "seconds_test_rows_search_only": round(search_only, 1),
            "rows_per_s": round(n / total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", type=int, default=75_000)
    parser.add_argument("--test", type=int, default=75_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/knn.json")
    args = parser.parse_args()
    results = {**run_facts({"faiss": faiss.omp_get_max_threads()},
                           "python3 benchmarks/bench_knn.py " + " ".join(sys.argv[1:])),
               "index": "flat (exact IP)",
               "vectors": "synthetic clustered, L2-normalised", "cases": []}
    for dim in args.dims:
        result = case(args.train, args.test, dim, args.folds, [5, 20, 50], seed=0)
        results["cases"].append(result)
        print(result, flush=True)
    results["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
