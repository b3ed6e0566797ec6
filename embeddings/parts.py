"""Resumable batch jobs: rows are processed in fixed parts, each part written atomically to scratch.

A crash loses at most the part in flight; a rerun with the same fingerprint skips the parts already on disk.
The part layout depends only on the (deterministic) row order and part size, so resumed output is identical.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import polars as pl
from tqdm import tqdm

from featurestore.store import FeatureStore, atomic_write_parquet


def scratch_for(store: FeatureStore, table: str, fingerprint: str) -> Path:
    """Scratch folder of this build; scratch of older fingerprints of the same table is stale and removed."""
    for old in store.scratch_dir.glob(f"{table}-*"):
        if old.name != f"{table}-{fingerprint}":
            shutil.rmtree(old, ignore_errors=True)
    return store.scratch(f"{table}-{fingerprint}")


def run_in_parts(
    rows: pl.DataFrame,
    part_size: int,
    scratch: Path,
    process: Callable[[pl.DataFrame], pl.DataFrame],
    desc: str,
    progress: bool,
) -> pl.DataFrame:
    """Apply `process` to consecutive slices of `rows`, persisting each result; return them concatenated."""
    n_parts = max(1, -(-rows.height // part_size))
    results = []
    with tqdm(total=rows.height, desc=desc, disable=not progress, unit="row") as bar:
        for index in range(n_parts):
            path = scratch / f"part-{index:05d}.parquet"
            chunk = rows.slice(index * part_size, part_size)
            if path.is_file():
                done = pl.read_parquet(path)
            else:
                done = process(chunk)
                atomic_write_parquet(done, path)
            results.append(done)
            bar.update(chunk.height)
    return pl.concat(results)
