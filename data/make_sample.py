"""Rebuild the embedded sample in data/sample/ from the read-only real data in ../shared/data/amazon2025.

train.parquet: all 632 real labelled rows (the first 132 rows of train.csv + 500 price-cluster rows, so the
expensive tail is over-represented: fine for a smoke run, biased for SMAPE). test.parquet: 200 real unlabelled
rows. images/: the 206 real product images, downscaled to at most 256 px (CLIP looks at 224 px anyway) to keep
the repo small; files that do not decode are kept byte-exact
when empty (10 failed downloads) or small and truncated (3), as real bad-input cases as a real bad-input case.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import polars as pl
from PIL import Image, ImageFile

MAX_SIDE = 256
KEEP_TRUNCATED_BELOW = 16_000


def main(shared: Path, out: Path) -> None:
    src = shared / "amazon2025"
    out.mkdir(parents=True, exist_ok=True)
    train = pl.concat([pl.read_parquet(src / f) for f in ("train_head132.parquet", "train_kmeans500.parquet")])
    test = pl.concat([pl.read_parquet(src / f) for f in ("test_head100.parquet", "sample_test.parquet")])
    train.write_parquet(out / "train.parquet", compression="zstd")
    test.write_parquet(out / "test.parquet", compression="zstd")
    images_out = out / "images"
    images_out.mkdir(exist_ok=True)
    manifest = pl.read_parquet(src / "images_manifest.parquet")
    for row in manifest.iter_rows(named=True):
        data = (src / row["file"]).read_bytes()
        target = images_out / row["image_basename"]
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except OSError as exc:
            # Empty or truncated in the source. Empty ones and the small truncated ones stay byte-exact as the
            # real bad-input cases; the larger truncated ones (a few bytes short) are downscaled from what
            # decodes, so they don't bloat the repo.
            if not data or len(data) <= KEEP_TRUNCATED_BELOW:
                print(f"kept undecodable {row['image_basename']} as is ({len(data)} bytes): {exc}")
                target.write_bytes(data)
                continue
            ImageFile.LOAD_TRUNCATED_IMAGES = True
            try:
                image = Image.open(io.BytesIO(data)).convert("RGB")
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = False
        image.thumbnail((MAX_SIDE, MAX_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        target.write_bytes(buffer.getvalue())
    print(f"train {train.height} rows, test {test.height} rows, {manifest.height} images -> {out}")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else here.parent.parent / "shared" / "data", here / "sample")
