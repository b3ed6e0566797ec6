"""Benchmark: text embedding throughput of the batch job vs a bare `SentenceTransformer.encode` of the same
texts (same model, batch size, max_seq_length, device), plus image embedding throughput.

The job's overhead over bare encode (sorting, parts flushed to scratch, the Parquet table, the manifest) should
stay under 20%. Both sides load the model outside the timed span. Results: benchmarks/results/embeddings.json.

    python3 benchmarks/bench_embeddings.py [--rows 320] [--mpnet-rows 128] [--images 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from embeddings.devices import resolve_device  # noqa: E402
from embeddings.text import TextEmbeddingBuilder, load_sentence_model  # noqa: E402
from features.ingest import ItemsBuilder  # noqa: E402
from featurestore.builders import BuildContext, run_builders  # noqa: E402
from featurestore.config import load_config  # noqa: E402
from featurestore.store import FeatureStore  # noqa: E402


def text_case(model_name: str, rows: int, tmp: Path) -> dict:
    sample = pl.concat([pl.read_parquet(ROOT / "data/sample/train.parquet"),
                        pl.read_parquet(ROOT / "data/sample/test.parquet")], how="diagonal_relaxed")
    train = sample.filter(pl.col("price").is_not_null()).head(rows)
    train.write_parquet(tmp / f"{model_name}.parquet")
    config = load_config(ROOT / "configs/default.toml", {
        "data.train": str(tmp / f"{model_name}.parquet"), "data.test": "", "store.dir": str(tmp / model_name),
        "text_embeddings.models": [model_name]})
    store = FeatureStore(config.store.dir)
    run_builders(BuildContext(store, config, progress=False), [ItemsBuilder(config)])
    texts = train["catalog_content"].to_list()
    tcfg = config.text_embeddings

    model = load_sentence_model(model_name, config)
    model.encode(texts[:8], batch_size=tcfg.batch_size)  # warm-up
    t0 = time.perf_counter()
    model.encode(texts, batch_size=tcfg.batch_size, normalize_embeddings=True, convert_to_numpy=True)
    bare = time.perf_counter() - t0

    import embeddings.text as text_module

    original = text_module.load_sentence_model
    text_module.load_sentence_model = lambda name, cfg: model  # same loaded model: time the job, not the load
    try:
        t0 = time.perf_counter()
        run_builders(BuildContext(store, config, progress=False), [TextEmbeddingBuilder(config, model_name)])
        job = time.perf_counter() - t0
    finally:
        text_module.load_sentence_model = original
    return {"rows": rows, "max_seq_length": tcfg.max_seq_length, "batch_size": tcfg.batch_size,
            "device": resolve_device(tcfg.device), "bare_encode_texts_per_s": round(rows / bare, 2),
            "job_texts_per_s": round(rows / job, 2), "job_overhead_pct": round(100 * (job - bare) / bare, 1)}


def image_case(n_images: int, tmp: Path) -> dict:
    from embeddings.images import ImageEmbeddingBuilder, ImageFilesBuilder

    manifest_dir = ROOT / "data/sample/images"
    files = sorted(p for p in manifest_dir.iterdir() if p.stat().st_size > 0)[:n_images]
    train = pl.read_parquet(ROOT / "data/sample/train.parquet").head(len(files)).with_columns(
        image_link=pl.Series([f"https://m.media-amazon.com/images/I/{p.name}" for p in files]))
    train.write_parquet(tmp / "img.parquet")
    config = load_config(ROOT / "configs/default.toml", {
        "data.train": str(tmp / "img.parquet"), "data.test": "", "store.dir": str(tmp / "img")})
    store = FeatureStore(config.store.dir)
    ctx = BuildContext(store, config, progress=False)
    run_builders(ctx, [ItemsBuilder(config), ImageFilesBuilder(config)])
    t0 = time.perf_counter()
    run_builders(ctx, [ImageEmbeddingBuilder(config)])
    seconds = time.perf_counter() - t0
    return {"images": len(files), "model": config.images.model, "device": resolve_device(config.images.device),
            "images_per_s_including_model_load": round(len(files) / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--mpnet-rows", type=int, default=128)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/embeddings.json")
    args = parser.parse_args()
    import torch

    results: dict = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "text": {}}
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        for name, rows in (("minilm", args.rows), ("mpnet", args.mpnet_rows)):
            results["text"][name] = text_case(name, rows, tmp)
            print(name, results["text"][name], flush=True)
        results["image"] = image_case(args.images, tmp)
        print("image", results["image"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
