"""Image files and image embeddings.

`image_files`: one row per item with an image link — where its file is and what happened fetching it.
`image_emb__<alias>`: an open_clip image embedding per item plus `image_ok`. Empty, truncated, corrupt,
non-image, oversized and decompression-bomb files get a zero vector, `image_ok = false` and the reason in
`image_error`; they never stop the job.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from embeddings.download import Downloader, FetchOutcome, resolve_local
from embeddings.parts import reusable_rows, reuse_key, run_in_parts, scratch_for
from featurestore.builders import BuildContext, Built, FeatureBuilder, OnlineRows
from featurestore.config import Config, ImageConfig
from featurestore.devices import resolve_device
from featurestore.errors import ConfigError, UserError
from featurestore.names import image_emb_table
from featurestore.store import FeatureStore, file_sha256

IMAGE_FILES_SCHEMA = {
    "url": pl.String, "path": pl.String, "status": pl.String, "bytes": pl.Int64, "sha256": pl.String,
    "error": pl.String,
}


def image_folder(config: Config, store_root: Path, source: str) -> Path:
    icfg = config.images
    if source == "folder":
        if not config.data.images_dir:
            raise ConfigError("images.source = 'folder' needs data.images_dir; or set images.source = 'download'")
        return Path(config.data.images_dir)
    if source == "download":
        return Path(icfg.download_dir) if icfg.download_dir else store_root / "images"
    raise ConfigError(f"images.source = {source!r}; expected 'folder' or 'download'")


def outcomes_table(ids: pl.Series, outcomes: list[FetchOutcome]) -> pl.DataFrame:
    rows = {o.sample_id: o for o in outcomes}
    data: dict[str, list[Any]] = {name: [] for name in IMAGE_FILES_SCHEMA}
    for sid in ids.to_list():
        outcome = rows[sid]
        for name in IMAGE_FILES_SCHEMA:
            data[name].append(getattr(outcome, name))
    return pl.DataFrame({"sample_id": ids, **data}, schema_overrides=IMAGE_FILES_SCHEMA)


class ImageFilesBuilder(FeatureBuilder):
    table = "image_files"
    version = "1"
    inputs = ("items",)
    reads = ("data.images_dir", "images.source", "images.download_dir", "images.max_file_bytes", "images.workers",
             "images.per_host", "images.timeout_s", "images.deadline_s", "images.retries")
    # How a download is paced and how long it waits; which files arrived is in the table itself (status column).
    not_fingerprinted = ("images.source", "images.workers", "images.per_host", "images.timeout_s",
                         "images.deadline_s", "images.retries")

    def __init__(self, config: Config, force_download: bool = False) -> None:
        super().__init__(config)
        self.source = "download" if force_download else config.images.source

    def params(self) -> dict[str, Any]:
        return {**super().params(), "source": self.source}

    def external_fingerprint(self) -> str:
        if self.source != "folder" or not self.config.data.images_dir:
            return ""
        folder = Path(self.config.data.images_dir)
        if not folder.is_dir():
            return "missing"
        listing = sorted(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in folder.iterdir())
        return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]

    def build(self, ctx: BuildContext) -> Built:
        items = ctx.store.read("items", columns=["sample_id", "image_link"]).sort("sample_id")
        icfg = self.config.images
        folder = image_folder(self.config, ctx.store.root, self.source)
        pairs = list(zip(items["sample_id"].to_list(), items["image_link"].to_list(), strict=True))
        if self.source == "folder":
            outcomes = [resolve_local(folder, sid, url) for sid, url in pairs]
        else:
            downloader = Downloader(folder, timeout_s=icfg.timeout_s, retries=icfg.retries,
                                    max_bytes=icfg.max_file_bytes, workers=icfg.workers, per_host=icfg.per_host,
                                    deadline_s=icfg.deadline_s)
            outcomes = downloader.fetch_all(pairs, progress=ctx.progress)
        table = outcomes_table(items["sample_id"], outcomes)
        # Files under the store are recorded relative to it, so a copied or moved store reads its own copies.
        root = str(ctx.store.root) + os.sep
        table = table.with_columns(pl.col("path").str.strip_prefix(root))
        return Built(table, {"status_counts": dict(table.group_by("status").len().iter_rows())})

    supports_online = True

    def online_state(self, trained: FeatureStore, threads: int) -> Path:
        """Where new rows' images are: the configured folder, or (images.source = "download") a folder of this
        process's own, never the store (a served request must not change it)."""
        if self.source == "folder":
            return image_folder(self.config, trained.root, self.source)
        return Path(tempfile.mkdtemp(prefix="pricestack-images-"))

    def online(self, state: Path, rows: OnlineRows) -> pl.DataFrame:
        """A missing or undecodable image is recorded as such (status), as in `build`: the image table then gives
        the row `image_ok = false` and a zero vector, the path every training row without an image took."""
        items = rows.tables["items"]
        pairs = list(zip(items["sample_id"].to_list(), items["image_link"].to_list(), strict=True))
        if self.source == "folder":
            outcomes = [resolve_local(state, sid, url) for sid, url in pairs]
        else:
            icfg = self.config.images
            outcomes = Downloader(state, timeout_s=icfg.timeout_s, retries=icfg.retries, max_bytes=icfg.max_file_bytes,
                                  workers=icfg.workers, per_host=icfg.per_host,
                                  deadline_s=icfg.deadline_s).fetch_all(pairs, progress=False)
        return outcomes_table(items["sample_id"], outcomes)


def load_image(path: str | None, max_bytes: int, max_pixels: int) -> tuple[Any, str | None]:
    """(RGB image, None) or (None, reason). Never raises for a bad file."""
    from PIL import Image

    if path is None:
        return None, "no file"
    try:
        size = os.path.getsize(path)
        if size == 0:
            return None, "empty file"
        if size > max_bytes:
            return None, f"file is {size:,} bytes > images.max_file_bytes"
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # Checked from the header, before any pixel is decoded: a bomb never gets to allocate.
                if image.width * image.height > max_pixels:
                    return None, f"{image.width}x{image.height} pixels > images.max_pixels (decompression bomb?)"
                image.load()
                return image.convert("RGB"), None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"{type(exc).__name__}: {exc}"


RANDOM_INIT_SEED = 0
RANDOM = "random"
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _weights_hash(path: str) -> str:
    """sha256 of a weights file, once per process (fingerprints are computed several times per command)."""
    return file_sha256(Path(path))


class ClipEncoder:
    """open_clip behind the encoders' interface (preprocess one image, embed a stacked batch)."""

    def __init__(self, icfg: ImageConfig, threads: int) -> None:
        import open_clip
        import torch

        torch.set_num_threads(threads)
        if not icfg.pretrained:
            raise UserError("images.encoder = 'open_clip' needs images.pretrained: a pretrained tag (internet once) "
                            "or a local checkpoint, or 'random' for random weights (a code-path check only); an "
                            "offline pretrained choice is images.encoder = 'resnet50_nsfw' or 'vit_s16'")
        self.device = resolve_device(icfg.device)
        random_init = icfg.pretrained == RANDOM
        if random_init:
            log.warning("images: open_clip %s with RANDOM weights: these image features carry no product "
                        "information (pretrained = 'random')", icfg.model)
        # Random weights come from torch's global generator: seeded, or two builds of the same store got
        # different "image features" and everything downstream of them differed too.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            self.model, _, self._preprocess = open_clip.create_model_and_transforms(
                icfg.model, pretrained=None if random_init else icfg.pretrained, device=self.device)
        self.model.eval()
        self.dim = int(self.model.visual.output_dim)
        checkpoint = Path(icfg.pretrained)
        self.weights_sha256 = file_sha256(checkpoint) if checkpoint.is_file() else icfg.pretrained

    def preprocess(self, image: Any) -> np.ndarray:
        return self._preprocess(image).numpy()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        import torch

        tensor = torch.from_numpy(batch).to(self.device)
        with torch.no_grad(), torch.autocast(device_type=self.device.split(":")[0], enabled=self.device != "cpu"):
            features = self.model.encode_image(tensor).float()
        return torch.nn.functional.normalize(features, dim=-1).cpu().numpy()


def load_encoder(icfg: ImageConfig, threads: int) -> Any:
    """The configured image encoder: an offline pretrained ONNX backbone, or open_clip."""
    if icfg.encoder == "open_clip":
        return ClipEncoder(icfg, threads)
    from embeddings.image_encoders import OnnxImageEncoder

    return OnnxImageEncoder(icfg.encoder, threads=threads, device=icfg.device)


class ImageEncoder:
    """One loaded encoder embedding part after part (the embed stage's unit, built once per worker). A part is a
    frame of (sample_id, path); the result is (sample_id, embedding, image_ok, image_error) plus the run facts."""

    def __init__(self, icfg: ImageConfig, store_root: str, batch_size: int, threads: int) -> None:
        self.encoder = load_encoder(icfg, threads)
        self.root, self.batch_size = Path(store_root), batch_size
        self.max_file_bytes, self.max_pixels = icfg.max_file_bytes, icfg.max_pixels

    def __call__(self, part: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, Any]]:
        dim = self.encoder.dim
        vectors = np.zeros((part.height, dim), dtype=np.float32)
        errors: list[str | None] = []
        arrays, positions = [], []
        for position, path in enumerate(part["path"].to_list()):
            full = None if path is None else str(self.root / path)  # relative ones are in the store
            image, error = load_image(full, self.max_file_bytes, self.max_pixels)
            errors.append(error)
            if image is not None:
                arrays.append(self.encoder.preprocess(image))
                positions.append(position)
        for start in range(0, len(arrays), self.batch_size):
            batch = np.stack(arrays[start : start + self.batch_size])
            vectors[positions[start : start + self.batch_size]] = self.encoder.embed(batch)
        frame = part.select("sample_id").with_columns(
            pl.Series("embedding", vectors, dtype=pl.Array(pl.Float32, dim)),
            pl.Series("image_ok", [e is None for e in errors], dtype=pl.Boolean),
            pl.Series("image_error", errors, dtype=pl.String),
        )
        return frame, {"weights_sha256": self.encoder.weights_sha256, "device": self.encoder.device}


class ImageEmbeddingBuilder(FeatureBuilder):
    version = "1"
    inputs = ("image_files",)
    extra_versions = ("torch", "open_clip_torch", "onnxruntime", "pillow")
    reads = ("images.encoder", "images.alias", "images.model", "images.pretrained", "images.batch_size",
             "images.max_pixels", "images.max_file_bytes", "images.device")
    # The alias only names the table. Threads come from the engine (the reproducibility promise is per thread count).
    not_fingerprinted = ("images.alias",)

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.table = image_emb_table(config.images.alias)

    def params(self) -> dict[str, Any]:
        random_init = self.config.images.encoder == "open_clip" and self.config.images.pretrained == RANDOM
        return {**super().params(), **({"random_init_seed": RANDOM_INIT_SEED} if random_init else {})}

    def external_fingerprint(self) -> str:
        """The weights file's hash: a different packaged model rebuilds the table."""
        if self.config.images.encoder == "open_clip":
            return ""
        from embeddings.image_encoders import BACKBONES

        return _weights_hash(str(BACKBONES[self.config.images.encoder].weights_path()))

    def build(self, ctx: BuildContext) -> Built:
        icfg = self.config.images
        files = ctx.store.read("image_files", columns=["sample_id", "path"]).sort("sample_id")
        hashes = ctx.store.read("image_files", columns=["sample_id", "sha256"])
        reused = reusable_rows(ctx.store, self.table, reuse_key(self, self.params()), hashes,
                               lambda store: store.read("image_files", columns=["sample_id", "sha256"]))
        if reused is not None:
            files = files.join(reused.select("sample_id"), on="sample_id", how="anti")
            if files.is_empty():
                return self._built(reused.sort("sample_id"), reused.height)
        # Paths relative to the store resolve against it on the worker: a multi-node cluster needs the store and
        # the image folder on a filesystem every node mounts at the same path (README, "On a cluster").
        encoder = (ImageEncoder, (self._unit(), str(ctx.store.root), icfg.batch_size))
        scratch = scratch_for(ctx.store, self.table, ctx.fingerprint)
        table, run = run_in_parts(files, icfg.batch_size * 8, scratch, ctx.engine, "embed", encoder, self.table,
                                  ctx.progress)
        if reused is not None:
            table = pl.concat([reused.select(table.columns).cast(table.schema), table]).sort("sample_id")
        return self._built(table, 0 if reused is None else reused.height,
                           {**run, "engine": ctx.engine.record("embed")})

    supports_online = True

    def online_state(self, trained: FeatureStore, threads: int) -> ImageEncoder:
        """The encoder, loaded once; one image per batch, so no new row's vector depends on its batch-mates (see
        the text builder)."""
        return ImageEncoder(self._unit(), str(trained.root), 1, threads)

    def online(self, state: ImageEncoder, rows: OnlineRows) -> pl.DataFrame:
        return state(rows.tables["image_files"].select("sample_id", "path"))[0]

    def _unit(self) -> ImageConfig:
        """What an encoder reads, its device resolved here, where the fingerprint hashed it (not on a worker: see
        the text builder)."""
        icfg = self.config.images
        return ImageConfig(**{k: getattr(icfg, k) for k in ("encoder", "model", "pretrained", "max_file_bytes",
                                                            "max_pixels")},
                           device=resolve_device(icfg.device, "images.device"))

    def _built(self, table: pl.DataFrame, rows_reused: int, run: dict[str, Any] | None = None) -> Built:
        return Built(table, {"encoder": self.config.images.encoder, "dim": table.schema["embedding"].size,
                             "images_ok": int(table["image_ok"].sum()), **(run or {}),
                             "reuse_key": reuse_key(self, self.params()), "rows_reused": rows_reused})
