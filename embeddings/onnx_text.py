"""ONNX Runtime backends for the sentence-transformers encoders: "onnx" (fp32) and "onnx_int8" (dynamic int8).

sentence-transformers' own `backend="onnx"` needs optimum-onnx, which pins transformers < 4.58 and so cannot be
installed beside sentence-transformers 6. The same three steps are done here with the installed libraries:
1. torch.onnx exports the transformer (eager attention, so onnxruntime can fuse it) to token embeddings;
2. onnxruntime's transformer optimizer fuses attention, GELU and layer norms;
3. onnxruntime.quantization quantises the weight MatMuls to int8 per output channel, then checks the result
   on fixed calibration texts: mean cosine to the fp32 export must reach 0.985, else the feed-forward output
   projections stay fp32 (MPNet needs this), else the export is refused.
Each export is written once into the cache folder, keyed by the sha256 of the weights and the library
versions, and reused by later runs. Pooling and normalisation run the model's own sentence-transformers modules on
the ONNX token embeddings, so every model keeps its pooling mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import ConfigError, InputError
from featurestore.lock import pid_alive
from featurestore.store import atomic_write_text, file_sha256

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "onnx_int8")
# Bump when the export recipe changes: every cached export is then rebuilt.
EXPORT_VERSION = "1"
_VERSIONED = ("torch", "transformers", "onnx", "onnxruntime")


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the transformer's weight files (safetensors or torch .bin) and its config."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in {".safetensors", ".bin"} or p.name == "config.json")
    if not files:
        raise InputError(f"{model_dir}: no weight files (*.safetensors, *.bin) to export to ONNX")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def export_key(model_dir: Path) -> str:
    """Weights, library versions and recipe: what the exported graph depends on (its axes are dynamic, so not the
    sequence length)."""
    versions = {name: metadata.version(name) for name in _VERSIONED}
    payload = {"weights": weights_sha256(model_dir), "versions": versions, "recipe": EXPORT_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _export_fp32(st_model: Any, path: Path) -> None:
    import torch

    transformer = st_model[0].auto_model
    # The fuser recognises the eager attention pattern, not SDPA's; eager costs nothing after fusion.
    transformer.set_attn_implementation("eager")
    names = [name for name in st_model.tokenizer.model_input_names if name != "position_ids"]
    example = st_model.tokenizer(["a short example", "a somewhat longer example text for tracing"],
                                 padding=True, return_tensors="pt")

    class TokenEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return self.transformer(**dict(zip(names, inputs, strict=True))).last_hidden_state

    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "token_embeddings"]}
    with torch.no_grad():
        torch.onnx.export(TokenEmbeddings().eval(), tuple(example[name] for name in names), str(path),
                          input_names=names, output_names=["token_embeddings"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)


def _fuse(path: Path, out: Path, st_model: Any) -> None:
    from onnxruntime.transformers import optimizer

    config = st_model[0].auto_model.config
    fused = optimizer.optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                                     hidden_size=config.hidden_size, opt_level=1)
    fused.save_model_to_file(str(out))


# Fixed texts the int8 export is checked on (cosine to the fp32 export), so the check needs no data.
CALIBRATION_TEXTS = [
    "Item Name: Organic Green Tea, 100 Count Tea Bags\nValue: 100.0\nUnit: Count",
    "Item Name: Stainless Steel Water Bottle 32 oz, Vacuum Insulated, Leak Proof Lid",
    "Bullet Point 1: Made from 100% natural ingredients, no artificial colours or flavours",
    "Item Name: Extra Virgin Olive Oil, Cold Pressed (Pack of 2)\nValue: 33.8\nUnit: Fl Oz",
    "Nike running shoes men size 10 barely worn, black and white",
    "Women's leather handbag with adjustable strap, brand new with tags",
    "iPhone 11 case clear shockproof",
    "Item Name: Spicy Chipotle Hot Sauce 5 oz bottle, gluten free, vegan",
    "Lot of 12 children's books, hardcover, good condition, ages 3-6",
    "Bullet Point 2: Fits most standard dishwashers; easy to install in minutes with the included tools",
    "Item Name: Dark Chocolate Almonds 16 Ounce Resealable Bag\nValue: 16.0\nUnit: Ounce",
    "Vintage gold necklace with pendant",
    "Item Name: Baby Wipes, Unscented, 12 packs of 64 wipes (768 total)",
    "Makeup brush set 10 pieces with travel pouch",
    "Item Name: Coffee Beans Whole Bean Medium Roast 2 lb\nValue: 32.0\nUnit: Ounce",
    "Bluetooth wireless earbuds with charging case, 24 hour battery",
]
# A floor against a broken export (a saturated one scores ~0.02); benchmarks/results/embeddings.json measures
# the cosine on real catalog texts (MiniLM 0.993, MPNet 0.991).
MIN_INT8_COSINE = 0.985


def _ffn_down_projections(path: Path) -> list[str]:
    """MatMuls fed by a GELU: the feed-forward output projections, whose inputs carry activation outliers."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {output: node for node in graph.node for output in node.output}
    return [node.name for node in graph.node if node.op_type == "MatMul"
            and "Gelu" in getattr(producer.get(node.input[0]), "op_type", "")]


def _quantize(path: Path, out: Path, exclude: list[str]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # per_channel: per-tensor int8 loses too much (cosine 0.95 on MiniLM). reduce_range (7-bit weights): CPUs
    # without VNNI saturate u8 x s8 products, which wrecked MPNet (cosine 0.02). Fused operators are in the
    # com.microsoft domain, which shape inference cannot type: tell the quantiser they are float.
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                     nodes_to_exclude=exclude,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True})


def _calibration_cosine(st_model: Any, fp32: Path, int8: Path) -> float:
    reference = OnnxSentenceEncoder(st_model, fp32, threads=1).encode(CALIBRATION_TEXTS, batch_size=16)
    vectors = OnnxSentenceEncoder(st_model, int8, threads=1).encode(CALIBRATION_TEXTS, batch_size=16)
    return float((reference * vectors).sum(axis=1).mean())


def _quantize_checked(st_model: Any, fp32: Path, out: Path, name: str) -> dict[str, Any]:
    """Quantise every weight MatMul; if that costs too much accuracy, keep the FFN down-projections in fp32."""
    tried: list[float] = []
    for exclude in ([], _ffn_down_projections(fp32)):
        _quantize(fp32, out, exclude)
        cosine = _calibration_cosine(st_model, fp32, out)
        tried.append(round(cosine, 5))
        if cosine >= MIN_INT8_COSINE:
            return {"int8_cosine_to_fp32": cosine, "fp32_matmuls": len(exclude)}
    raise InputError(f"{name}: int8 export keeps mean cosine {tried} to fp32 on the calibration texts "
                       f"(< {MIN_INT8_COSINE}); use text_embeddings.backend = \"onnx\" for this model")


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """The tracer's and quantiser's advice (TracerWarning, "consider pre-processing", logged on the root logger)
    is about their general use, not this recipe, whose result is checked; keep it out of the user's output."""
    root = logging.getLogger()
    drop_root_warnings = logging.Filter("pricestack.never")  # passes nothing logged on the root logger itself
    root.addFilter(drop_root_warnings)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(drop_root_warnings)


STAGING = ".tmp"  # an export in progress: <name>-<key>.tmp<pid>


def _remove_dead_staging(folder: Path) -> None:
    """Staging folders of exports whose process died (kill -9 left 173 MB each)."""
    for staging in folder.glob(f"*{STAGING}*") if folder.is_dir() else []:
        pid = staging.name.rpartition(STAGING)[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            log.info("removing %s, left by an export that did not finish", staging)
            shutil.rmtree(staging, ignore_errors=True)


def _export_intact(target: Path, filename: str) -> bool:
    """The export's file has the sha256 recorded when it was made. Exports cached before hashes were recorded
    get theirs recorded now (trusted on first use)."""
    record_path = target / "export.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return False
    digest = file_sha256(target / filename)
    hashes = record.get("sha256") if isinstance(record.get("sha256"), dict) else {}
    if filename not in hashes:
        record["sha256"] = {**hashes, filename: digest}
        atomic_write_text(record_path, json.dumps(record, indent=1))
        return True
    return hashes[filename] == digest


def exported_model(st_model: Any, name: str, model_dir: Path, cache_dir: Path, backend: str) -> Path:
    """The cached ONNX file for this model and backend, exported on first use (atomically: a folder rename)."""
    if backend not in BACKENDS[1:]:
        raise ConfigError(f"text_embeddings.backend = {backend!r}; expected one of {', '.join(BACKENDS)}")
    key = export_key(model_dir)
    target = cache_dir / "onnx" / f"{name}-{key}"
    filename = "model_int8.onnx" if backend == "onnx_int8" else "model.onnx"
    _remove_dead_staging(target.parent)
    if (target / filename).is_file():
        if _export_intact(target, filename):
            return target / filename
        # A damaged export (64 flipped bytes moved 441 of 832 rows' neighbour lists, exit 0): export it again.
        log.warning("the cached ONNX export %s fails its sha256 check; exporting it again", target / filename)
        shutil.rmtree(target, ignore_errors=True)
    staging = target.with_name(f"{target.name}{STAGING}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log.info("exporting %s to ONNX (once; cached in %s)", name, target)
    try:
        with _quietly():
            _export_fp32(st_model, staging / "raw.onnx")
            _fuse(staging / "raw.onnx", staging / "model.onnx", st_model)
            (staging / "raw.onnx").unlink()
            report = _quantize_checked(st_model, staging / "model.onnx", staging / "model_int8.onnx", name)
        hashes = {f.name: file_sha256(f) for f in sorted(staging.glob("*.onnx"))}
        (staging / "export.json").write_text(json.dumps({"key": key, **report, "sha256": hashes}, indent=1))
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same export first; both are built from identical inputs.
            if not (target / filename).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target / filename


class OnnxSentenceEncoder:
    """A sentence-transformers model whose transformer runs on ONNX Runtime; same `encode` contract."""

    def __init__(self, st_model: Any, onnx_path: Path, threads: int, rows_in_parallel: bool = False) -> None:
        """`rows_in_parallel` (online pricing, one text per batch): each run on one thread, the batch's texts run
        side by side on `threads` threads, and idle threads sleep instead of spinning. 8 one-text runs took 13 ms
        so vs 19 ms one after another on two threads each, and threads spinning after a run slowed the kNN and
        MLP kernels that came next (2 cores)."""
        import onnxruntime as ort

        self.tokenizer = st_model.tokenizer
        self.max_seq_length = st_model.max_seq_length
        self.onnx_path = onnx_path
        self._heads = list(st_model)[1:]  # pooling, normalisation: the model's own modules
        self._dim = st_model.get_embedding_dimension()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1 if rows_in_parallel else threads
        options.inter_op_num_threads = 1
        if rows_in_parallel:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self._inputs = [node.name for node in self.session.get_inputs()]
        self._pool = ThreadPoolExecutor(threads, "onnx-rows") if rows_in_parallel and threads > 1 else None

    def get_embedding_dimension(self) -> int:
        return self._dim

    def encode(self, texts: list[str], batch_size: int, normalize_embeddings: bool = True,
               convert_to_numpy: bool = True) -> np.ndarray:
        import torch

        # Longest first, like sentence-transformers: batches of similar length pad little.
        order = np.argsort([-len(text) for text in texts], kind="stable")
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        def batches() -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
            for start in range(0, len(texts), batch_size):
                index = order[start : start + batch_size]
                # Tokenised on this thread: a fast tokenizer called from two threads at once can fail.
                tokens = self.tokenizer([texts[i] for i in index], padding=True, truncation=True,
                                        max_length=self.max_seq_length, return_tensors="np")
                yield index, {name: tokens[name].astype(np.int64) for name in self._inputs}

        if self._pool is not None:  # a few one-text batches (online): tokenised first, run side by side
            todo = list(batches())
            runs: Iterator[tuple[tuple[np.ndarray, dict[str, np.ndarray]], list[Any]]] = zip(
                todo, self._pool.map(lambda batch: self.session.run(None, batch[1]), todo), strict=True)
        else:
            runs = ((batch, self.session.run(None, batch[1])) for batch in batches())
        for (index, feeds), outputs in runs:
            token_embeddings = outputs[0]
            features: dict[str, Any] = {"token_embeddings": torch.from_numpy(token_embeddings),
                                        "attention_mask": torch.from_numpy(feeds["attention_mask"])}
            with torch.no_grad():
                for module in self._heads:
                    features = module(features)
            vectors = features["sentence_embedding"]
            if normalize_embeddings:
                vectors = torch.nn.functional.normalize(vectors, dim=1)
            out[index] = vectors.numpy()
        return out
