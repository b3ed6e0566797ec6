"""`text_emb__<model>`: one sentence-transformers embedding per item (`sample_id`, `embedding` FLOAT[dim]).

Texts are sorted by length so each batch pads little; parts are flushed to scratch so a crash resumes. Long
texts are truncated at max_seq_length (default) or, with long_text = "chunk", split into token windows whose
embeddings are mean-pooled and re-normalised.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from embeddings.onnx_text import OnnxSentenceEncoder, exported_model
from embeddings.parts import reusable_rows, reuse_key, run_in_parts, scratch_for
from featurestore.builders import BuildContext, Built, FeatureBuilder, OnlineRows
from featurestore.config import Config, TextEmbeddingConfig
from featurestore.devices import resolve_device
from featurestore.errors import ConfigError, UserError
from featurestore.names import TEXT_EMB_PREFIX, text_emb_table
from featurestore.store import FeatureStore
from weights.text import resolve_text_model


def table_name(alias: str) -> str:
    return text_emb_table(alias)


def resolve_backend(config: Config) -> str:
    return backend_of(config.text_embeddings)


def backend_of(tcfg: TextEmbeddingConfig) -> str:
    """torch or one of the ONNX Runtime backends; "auto" = torch on a GPU, onnx_int8 on CPU."""
    device = resolve_device(tcfg.device)
    if tcfg.backend == "auto":
        return "torch" if device.startswith("cuda") else "onnx_int8"
    if tcfg.backend != "torch" and device.startswith("cuda"):
        raise UserError(f"text_embeddings.backend = {tcfg.backend!r} runs on CPU, but device is {device!r}; "
                        "set backend = \"torch\" (fp16) on a GPU or device = \"cpu\"")
    return tcfg.backend


def load_sentence_model(name: str, tcfg: TextEmbeddingConfig, threads: int, online: bool = False) -> Any:
    """A model with sentence-transformers' `encode` contract, on the configured device and backend, its CPU
    inference pinned to `threads`; `online`: encoding a few texts one per batch (OnnxSentenceEncoder's
    rows_in_parallel)."""
    from sentence_transformers import SentenceTransformer

    device = resolve_device(tcfg.device)
    path = resolve_text_model(name, tcfg.cache_dir)
    model = SentenceTransformer(path, device=device)
    model.max_seq_length = tcfg.max_seq_length
    backend = backend_of(tcfg)
    if backend != "torch":
        if not Path(path).is_dir():
            raise UserError(f"text_embeddings.backend = {backend!r} exports local weights; {name!r} is not a "
                            "folder (use the minilm/mpnet aliases, a local folder, or backend = \"torch\")")
        alias = table_name(name).removeprefix(TEXT_EMB_PREFIX)
        onnx_path = exported_model(model, alias, Path(path), Path(tcfg.cache_dir).expanduser(), backend)
        return OnnxSentenceEncoder(model, onnx_path, threads=threads, rows_in_parallel=online)
    if device.startswith("cuda"):
        model.half()
    return model


def chunk_texts(model: Any, texts: list[str], window: int) -> tuple[list[str], np.ndarray]:
    """Split each text into windows of `window` tokens (by the model's tokenizer offsets).

    Returns the chunk texts and, per chunk, the index of the text it came from."""
    encoded = model.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    chunks: list[str] = []
    owners: list[int] = []
    for index, (text, offsets) in enumerate(zip(texts, encoded["offset_mapping"], strict=True)):
        if not offsets:
            chunks.append(text)
            owners.append(index)
            continue
        for start in range(0, len(offsets), window):
            span = offsets[start : start + window]
            chunks.append(text[span[0][0] : span[-1][1]])
            owners.append(index)
    return chunks, np.asarray(owners)


def encode(model: Any, texts: list[str], batch_size: int, long_text: str) -> np.ndarray:
    if long_text == "truncate":
        return model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    if long_text != "chunk":
        raise ConfigError(f"text_embeddings.long_text = {long_text!r}; expected 'truncate' or 'chunk'")
    chunks, owners = chunk_texts(model, texts, window=model.max_seq_length - 2)
    vectors = model.encode(chunks, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    pooled = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
    np.add.at(pooled, owners, vectors)
    pooled /= np.linalg.norm(pooled, axis=1, keepdims=True).clip(min=1e-12)
    return pooled


def _export_name(model: Any) -> str:
    path = getattr(model, "onnx_path", None)
    return "" if path is None else f"{path.parent.name}/{path.name}"


class TextEncoder:
    """One loaded model encoding part after part: the unit of the embed stage (an engine builds one per worker,
    so the model loads once per worker). A part is a frame of (sample_id, text); the result is (sample_id,
    embedding) plus what the manifest records about the model."""

    def __init__(self, model_name: str, tcfg: TextEmbeddingConfig, batch_size: int, threads: int,
                 online: bool = False) -> None:
        import torch

        torch.set_num_threads(threads)
        self.model = load_sentence_model(model_name, tcfg, threads, online)
        self.batch_size, self.long_text = batch_size, tcfg.long_text
        # sentence-transformers 6 renamed the method; older releases only have the first name.
        dim_of = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim_of()

    def __call__(self, part: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, Any]]:
        vectors = encode(self.model, part["text"].to_list(), self.batch_size, self.long_text).astype(np.float32)
        embedding = pl.Series("embedding", vectors, dtype=pl.Array(pl.Float32, self.dim))
        return part.select("sample_id").with_columns(embedding), {"onnx_export": _export_name(self.model)}


class TextEmbeddingBuilder(FeatureBuilder):
    version = "1"
    inputs = ("items",)
    extra_versions = ("torch", "sentence-transformers", "transformers", "onnxruntime")
    reads = ("text_embeddings",)
    # Each table is one model (its name is in params); part files hold whole batches; the export cache is where
    # the ONNX files live (which export made the vectors is in the manifest). device and backend are hashed as
    # resolved, below. Threads come from the engine (the reproducibility promise is per thread count).
    not_fingerprinted = ("text_embeddings.models", "text_embeddings.flush_every", "text_embeddings.cache_dir",
                         "text_embeddings.device", "text_embeddings.backend")

    def __init__(self, config: Config, model_name: str) -> None:
        super().__init__(config)
        self.model_name = model_name
        self.table = table_name(model_name)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "model": self.model_name, "normalized": True,
                "device": resolve_device(self.config.text_embeddings.device), "backend": resolve_backend(self.config)}

    def build(self, ctx: BuildContext) -> Built:
        tcfg = self.config.text_embeddings
        items = ctx.store.read("items", columns=["sample_id", "text"])
        reused = reusable_rows(ctx.store, self.table, reuse_key(self, self.params()), items,
                               lambda store: store.read("items", columns=["sample_id", "text"]))
        todo = items if reused is None else items.join(reused.select("sample_id"), on="sample_id", how="anti")
        # Longest first: batches hold texts of similar length (little padding), and the slowest part runs first.
        rows = todo.with_columns(length=pl.col("text").str.len_bytes()).sort(
            ["length", "sample_id"], descending=[True, False]
        )

        # Device and backend are resolved here, where the fingerprint hashed them, not on the worker: a worker
        # without a GPU (engine.embed.num_gpus = 0 on a GPU cluster) must fail loudly, not make CPU vectors under a
        # GPU fingerprint.
        resolved = dataclasses.replace(tcfg, device=resolve_device(tcfg.device), backend=backend_of(tcfg))
        encoder = (TextEncoder, (self.model_name, resolved, tcfg.batch_size))
        scratch = scratch_for(ctx.store, self.table, ctx.fingerprint)
        run: dict[str, Any] = {}
        if rows.height:
            table, run = run_in_parts(rows, tcfg.batch_size * tcfg.flush_every, scratch, ctx.engine, "embed",
                                      encoder, self.table, ctx.progress)
            if reused is not None:
                table = pl.concat([reused.select(table.columns).cast(table.schema), table])
        else:
            assert reused is not None
            table = reused
        out = items.select("sample_id").join(table, on="sample_id", how="left", maintain_order="left")
        if out["embedding"].null_count():
            raise RuntimeError(f"{self.table}: {out['embedding'].null_count()} rows got no embedding")
        return Built(out, {"dim": out.schema["embedding"].size,
                           "device": resolved.device,
                           "backend": resolved.backend,
                           # <weights>-<export key>/<file> in the cache: which export made these vectors.
                           "onnx_export": run.get("onnx_export", ""),
                           "engine": ctx.engine.record("embed"),
                           "reuse_key": reuse_key(self, self.params()),
                           "rows_reused": 0 if reused is None else reused.height})

    supports_online = True

    def online_state(self, trained: FeatureStore, threads: int) -> TextEncoder:
        """The model, loaded once; one text per batch: with int8 ONNX a vector depends on its batch-mates (dynamic
        quantisation scales over the whole batch tensor; padding changes GEMM shapes), so a new row's price would
        move with the other rows sent with it."""
        tcfg = self.config.text_embeddings
        resolved = dataclasses.replace(tcfg, device=resolve_device(tcfg.device), backend=backend_of(tcfg))
        return TextEncoder(self.model_name, resolved, 1, threads, online=True)

    def online(self, state: TextEncoder, rows: OnlineRows) -> pl.DataFrame:
        return state(rows.tables["items"].select("sample_id", "text"))[0]
