"""Benchmark: what the Ray engine costs and gives, stage by stage, against the local engine on this machine.

Both engines run the same command sequence on fresh stores: `build-features` (every builder of the config), the
learners' cross-fitting, the stack. Each unit gets the same threads under both (the local engine's `models.threads`
= every core; under Ray `[engine.<stage>] num_cpus` = every core), so the tables must come out byte-identical: the
run checks it. Reported per stage: wall seconds under each engine (per-table build seconds summed by stage, plus the
whole command's wall), and Ray's fixed costs measured on their own: `import ray`, starting a private local Ray,
an encoder actor's model load + first part (against the same load and part here), and the first `ray.put` of a
training-matrix-sized array.

    python3 benchmarks/bench_engine.py --dataset sample                # the Amazon sample, configs/default.toml
    python3 benchmarks/bench_engine.py --dataset mercari --rows 10000  # Mercari listings, configs/mercari.toml
Results: benchmarks/results/engine.json (one entry per dataset and size; each entry is one run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from benchmarks.facts import run_facts  # noqa: E402
from featurestore.builders import BuildContext, run_builders  # noqa: E402
from featurestore.config import load_config  # noqa: E402
from featurestore.engine import LocalEngine, engine_for  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402
from pipeline.registry import builders_for  # noqa: E402
from pipeline.run import train_learners  # noqa: E402
from pipeline.stack import run_stack  # noqa: E402

MERCARI = ROOT.parent / "shared" / "data" / "mercari"
OUT = ROOT / "benchmarks" / "results" / "engine.json"


def _stage(table: str) -> str:
    for prefix, stage in (("text_emb__", "text_embedding"), ("image_emb__", "image_embedding"), ("knn__", "knn")):
        if table.startswith(prefix):
            return stage
    return "tabular"


def _digests(store: FeatureStore) -> dict[str, str]:
    files = sorted(store.tables_dir.glob("*.parquet")) + sorted(store.root.glob("submission.csv"))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def run_engine(kind: str, config_path: Path, overrides: dict[str, Any], store_dir: Path, trials: int
               ) -> tuple[dict[str, Any], dict[str, str]]:
    cores = os.cpu_count() or 1
    engine_settings = {f"engine.{s}": {"num_cpus": cores} for s in ("embed", "knn", "train", "stack")}
    config = load_config(config_path, {**overrides, **engine_settings, "store.dir": str(store_dir),
                                       "engine.kind": kind, "models.threads": 0})
    out: dict[str, Any] = {"stages": {}}
    t0 = time.perf_counter()
    engine = engine_for(config)
    out["engine_start_s"] = round(time.perf_counter() - t0, 2)
    store = FeatureStore(store_dir)
    t0 = time.perf_counter()
    results = run_builders(BuildContext(store, config, progress=False, engine=engine), builders_for(config))
    out["build_features_wall_s"] = round(time.perf_counter() - t0, 2)
    for result in results:
        stage = _stage(result.table)
        out["stages"][stage] = round(out["stages"].get(stage, 0.0) + result.seconds, 2)
    t0 = time.perf_counter()
    built = train_learners(config, store, progress=False, engine=engine)
    out["stages"]["training"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    record = run_stack(store, config, trials, built, engine=engine)
    out["stages"]["stack"] = round(time.perf_counter() - t0, 2)
    out["end_to_end_wall_s"] = round(out["build_features_wall_s"] + out["stages"]["training"]
                                     + out["stages"]["stack"], 2)
    out["stack_cv"] = {"metric": record.metric, "nested": record.stack_cv, "base": record.base_cv}
    out["threads_per_unit"] = {s: engine.unit_threads(s) for s in ("embed", "knn", "train", "stack")}
    if kind == "ray":
        out["nodes"] = {s: len(n) for s, n in engine.nodes.items()}  # type: ignore[attr-defined]
    return out, _digests(store)


def ray_overheads(rows: int, width: int) -> dict[str, Any]:
    """Ray's fixed costs, each on its own."""
    code = "import time; t = time.perf_counter(); import ray; print(time.perf_counter() - t)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    import ray

    from embeddings.text import TextEncoder

    config = load_config(None, {"engine.kind": "ray"})
    engine = engine_for(config)  # the private local Ray the runs above started is reused; started here otherwise
    part = pl.DataFrame({"sample_id": [1], "text": ["Stainless steel water bottle, 750 ml, pack of 2"]})
    tcfg = config.text_embeddings
    t0 = time.perf_counter()
    local = LocalEngine(os.cpu_count() or 1)
    list(local.map_parts("embed", TextEncoder, ("minilm", tcfg, 32), [part]))
    here = time.perf_counter() - t0
    t0 = time.perf_counter()
    list(engine.map_parts("embed", TextEncoder, ("minilm", tcfg, 32), [part]))
    on_actor = time.perf_counter() - t0
    matrix = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32)
    t0 = time.perf_counter()
    ray.put(matrix)
    put = time.perf_counter() - t0
    return {"import_ray_s": round(float(imported.stdout.strip()), 2),
            "encoder_model_load_and_one_part_here_s": round(here, 2),
            "encoder_actor_start_load_and_one_part_s": round(on_actor, 2),
            "first_put_s": round(put, 3), "first_put_mib": round(matrix.nbytes / 2**20, 1)}


def dataset(name: str, rows: int, work: Path) -> tuple[Path, dict[str, Any]]:
    if name == "sample":
        return ROOT / "configs" / "default.toml", {}
    train = pl.read_parquet(MERCARI / "train.parquet").head(rows)
    test = pl.read_parquet(MERCARI / "test_unlabelled.parquet").head(rows // 5)
    train.write_parquet(work / "train.parquet")
    test.write_parquet(work / "test.parquet")
    return ROOT / "configs" / "mercari.toml", {"data.train": str(work / "train.parquet"),
                                                "data.test": str(work / "test.parquet")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["sample", "mercari"], default="sample")
    parser.add_argument("--rows", type=int, default=10_000, help="Mercari training rows (test rows: a fifth)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        config_path, overrides = dataset(args.dataset, args.rows, work)
        local, local_digests = run_engine("local", config_path, overrides, work / "local", args.trials)
        ray_run, ray_digests = run_engine("ray", config_path, overrides, work / "ray", args.trials)
        rows = pl.read_parquet(work / "local" / "tables" / "items.parquet").height
        overheads = ray_overheads(rows, 512)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    key = "sample" if args.dataset == "sample" else f"mercari_{args.rows}"
    entry = {
        **run_facts({"local": "models.threads = 0 (every core) per unit, one unit at a time",
                     "ray": f"[engine.<stage>] num_cpus = {os.cpu_count()} per unit (private local Ray)"},
                    " ".join(["python3", "benchmarks/bench_engine.py", *sys.argv[1:]])),
        "rows": rows, "trials": args.trials, "local": local, "ray": ray_run,
        "ray_over_local_end_to_end": round(ray_run["end_to_end_wall_s"] / local["end_to_end_wall_s"], 3),
        "tables_equal": local_digests == ray_digests, "tables_compared": len(local_digests),
        "tables_differing": sorted(n for n in local_digests if local_digests[n] != ray_digests.get(n)),
        "ray_fixed_costs": overheads,
    }
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[key] = entry
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
