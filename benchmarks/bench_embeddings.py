"""Benchmark: text embedding throughput of the batch job vs a bare `SentenceTransformer.encode` of the same
texts (same model, batch size, max_seq_length, device), torch fp32 vs ONNX Runtime fp32 vs dynamic int8 (speed,
cosine to torch, how many kNN neighbour lists change), plus image embedding throughput per encoder.

The job's overhead over bare encode (sorting, parts flushed to scratch, the Parquet table, the manifest) should
stay under 20%. Both sides load the model outside the timed span. Results: benchmarks/results/embeddings.json.

    python3 benchmarks/bench_embeddings.py [--rows 320] [--mpnet-rows 128] [--images 64] [--only-backends]
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
from embeddings.text import TextEmbeddingBuilder, load_sentence_model  # noqa: E402
from features.ingest import ItemsBuilder  # noqa: E402
from featurestore.builders import BuildContext, run_builders  # noqa: E402
from featurestore.config import load_config  # noqa: E402
from featurestore.devices import resolve_device, threads  # noqa: E402
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

    model = load_sentence_model(model_name, config.text_embeddings, threads(config))
    model.encode(texts[:8], batch_size=tcfg.batch_size)  # warm-up
    t0 = time.perf_counter()
    model.encode(texts, batch_size=tcfg.batch_size, normalize_embeddings=True, convert_to_numpy=True)
    bare = time.perf_counter() - t0

    import embeddings.text as text_module

    original = text_module.load_sentence_model
    text_module.load_sentence_model = lambda *args: model  # same loaded model: time the job, not the load
    try:
        t0 = time.perf_counter()
        run_builders(BuildContext(store, config, progress=False), [TextEmbeddingBuilder(config, model_name)])
        job = time.perf_counter() - t0
    finally:
        text_module.load_sentence_model = original
    return {"rows": rows, "max_seq_length": tcfg.max_seq_length, "batch_size": tcfg.batch_size,
            "device": resolve_device(tcfg.device), "bare_encode_texts_per_s": round(rows / bare, 2),
            "job_texts_per_s": round(rows / job, 2), "job_overhead_pct": round(100 * (job - bare) / bare, 1)}


def backend_case(model_name: str, rows: int) -> dict:
    """torch fp32 vs ONNX Runtime fp32 vs dynamic int8 on the same real texts: speed, cosine, kNN agreement."""
    from embeddings.text import encode
    from features.knn import search

    sample = pl.concat([pl.read_parquet(ROOT / "data/sample/train.parquet"),
                        pl.read_parquet(ROOT / "data/sample/test.parquet")], how="diagonal_relaxed").head(rows)
    texts = sample["catalog_content"].to_list()
    n_base = int(sample["price"].is_not_null().sum())
    out: dict = {"rows": len(texts), "knn_base_rows": n_base}
    vectors = {}
    for backend in ("torch", "onnx", "onnx_int8"):
        config = load_config(ROOT / "configs/default.toml", {"text_embeddings.backend": backend})
        tcfg = config.text_embeddings
        t0 = time.perf_counter()
        # the first ONNX call exports (cached after)
        model = load_sentence_model(model_name, config.text_embeddings, threads(config))
        load = time.perf_counter() - t0
        encode(model, texts[:8], tcfg.batch_size, tcfg.long_text)  # warm-up
        t0 = time.perf_counter()
        vectors[backend] = encode(model, texts, tcfg.batch_size, tcfg.long_text)
        seconds = time.perf_counter() - t0
        out[backend] = {"texts_per_s": round(len(texts) / seconds, 2), "encode_s": round(seconds, 1),
                        "load_or_export_s": round(load, 1)}
        print(model_name, backend, out[backend], flush=True)
    reference = vectors["torch"]
    for backend in ("onnx", "onnx_int8"):
        cosine = (vectors[backend] * reference).sum(axis=1)
        entry = out[backend]
        entry["speedup_vs_torch"] = round(entry["texts_per_s"] / out["torch"]["texts_per_s"], 2)
        entry["cosine_to_torch_mean"] = round(float(cosine.mean()), 5)
        entry["cosine_to_torch_min"] = round(float(cosine.min()), 5)
        for k in (5, 20):
            _, ids_ref = search(reference[:n_base], reference, k)
            _, ids = search(vectors[backend][:n_base], vectors[backend], k)
            differ = sum(set(a) != set(b) for a, b in zip(ids_ref.tolist(), ids.tolist(), strict=True))
            overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids_ref.tolist(), ids.tolist(), strict=True)])
            entry[f"knn{k}_lists_differing"] = int(differ)
            entry[f"knn{k}_mean_overlap"] = round(float(overlap), 4)
    return out


def image_case(n_images: int, tmp: Path, encoder: str) -> dict:
    from embeddings.images import ImageEmbeddingBuilder, ImageFilesBuilder

    manifest_dir = ROOT / "data/sample/images"
    files = sorted(p for p in manifest_dir.iterdir() if p.stat().st_size > 0)[:n_images]
    train = pl.read_parquet(ROOT / "data/sample/train.parquet").head(len(files)).with_columns(
        image_link=pl.Series([f"https://m.media-amazon.com/images/I/{p.name}" for p in files]))
    train.write_parquet(tmp / "img.parquet")
    overrides = {"data.train": str(tmp / "img.parquet"), "data.test": "", "store.dir": str(tmp / f"img_{encoder}"),
                 "images.encoder": encoder}
    if encoder == "open_clip":
        overrides["images.pretrained"] = "random"  # no CLIP weights offline: throughput only
    config = load_config(ROOT / "configs/default.toml", overrides)
    store = FeatureStore(config.store.dir)
    ctx = BuildContext(store, config, progress=False)
    run_builders(ctx, [ItemsBuilder(config), ImageFilesBuilder(config)])
    t0 = time.perf_counter()
    run_builders(ctx, [ImageEmbeddingBuilder(config)])
    seconds = time.perf_counter() - t0
    return {"images": len(files), "encoder": encoder, "device": resolve_device(config.images.device),
            "images_per_s_including_model_load": round(len(files) / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--mpnet-rows", type=int, default=128)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--backend-rows", type=int, default=832, help="texts for the torch/ONNX/int8 comparison")
    parser.add_argument("--only-backends", action="store_true", help="run only the backend comparison and merge it")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/embeddings.json")
    args = parser.parse_args()
    import torch

    config = load_config(ROOT / "configs/default.toml")
    results: dict = {**run_facts({"torch": torch.get_num_threads(), "onnxruntime": threads(config),
                                  "models.threads": threads(config)},
                                 "python3 benchmarks/bench_embeddings.py " + " ".join(sys.argv[1:])),
                     "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "text": {}}
    if args.only_backends:  # this run's backend figures, under their own run facts, beside the earlier run's
        earlier = json.loads(args.out.read_text()) if args.out.is_file() else {}
        results = {**earlier, "text_backends_run": results}
    results["text_backends"] = {"threads": torch.get_num_threads(), "onnxruntime_threads": threads(config)}
    for name in ("minilm", "mpnet"):
        results["text_backends"][name] = backend_case(name, args.backend_rows)
    if args.only_backends:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        for name, rows in (("minilm", args.rows), ("mpnet", args.mpnet_rows)):
            results["text"][name] = text_case(name, rows, tmp)
            print(name, results["text"][name], flush=True)
        results["image"] = {}
        for encoder in ("resnet50_nsfw", "vit_s16", "open_clip"):
            results["image"][encoder] = image_case(args.images, tmp, encoder)
            print("image", results["image"][encoder], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
