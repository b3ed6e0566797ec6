"""Resumable batch jobs: rows are processed in fixed parts, each part written atomically to scratch.

A crash loses at most the part in flight; a rerun with the same fingerprint skips the parts already on disk.
The part layout depends only on the (deterministic) row order and part size, so resumed output is identical.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
from tqdm import tqdm

from featurestore.engine import Engine
from featurestore.fingerprint import code_hash
from featurestore.store import FeatureStore, atomic_write_parquet, atomic_write_text


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
    engine: Engine,
    stage: str,
    worker: tuple[type, tuple[Any, ...]],
    desc: str,
    progress: bool,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Hand the parts of `rows` not yet on disk to `engine` (each worker built as `worker[0](*worker[1],
    threads=...)`, called on a part, returning (frame, run facts)); persist each result as it arrives, in part
    order; return every part concatenated and the run facts (from the first part computed, kept in scratch so a
    resumed build still has them). The main process is the only writer: workers return frames."""
    n_parts = max(1, -(-rows.height // part_size))
    paths = [scratch / f"part-{index:05d}.parquet" for index in range(n_parts)]
    todo = [index for index in range(n_parts) if not paths[index].is_file()]
    facts_path = scratch / "run.json"
    # Parts computed now stay in memory; only the parts an earlier run left are read back.
    frames = {index: pl.read_parquet(paths[index]) for index in range(n_parts) if index not in todo}
    with tqdm(total=rows.height, desc=desc, disable=not progress, unit="row") as bar:
        bar.update(sum(frame.height for frame in frames.values()))
        chunks = [rows.slice(index * part_size, part_size) for index in todo]
        for index, (frame, facts) in zip(todo, engine.map_parts(stage, worker[0], worker[1], chunks), strict=True):
            atomic_write_parquet(frame, paths[index])
            if not facts_path.is_file():
                atomic_write_text(facts_path, json.dumps(facts))
            frames[index] = frame
            bar.update(frame.height)
    facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    return pl.concat([frames[index] for index in range(n_parts)]), facts


def reuse_key(builder: object, params: dict[str, Any]) -> str:
    """Rows of an earlier build may be reused only when the builder's code and parameters are the same."""
    payload = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(code_hash((type(builder),)).encode() + payload).hexdigest()[:16]


def reusable_rows(store: FeatureStore, table: str, key: str, wanted: pl.DataFrame,
                  key_of: Callable[[FeatureStore], pl.DataFrame]) -> pl.DataFrame | None:
    """Rows of the store's earlier `table` whose reuse key matches and whose identifying columns (`wanted`:
    sample_id + text or file hash) are unchanged.

    Embeddings cost minutes per thousand rows on a CPU: a new test file only embeds rows the store has not seen.
    Returns None when nothing can be reused."""
    if not store.table_path(table).is_file():
        return None
    info = store.info(table)
    if info is None or info.extra.get("reuse_key") != key:
        return None
    old = store.read(table).join(key_of(store), on="sample_id", how="inner")
    return old.join(wanted, on=wanted.columns, how="semi").drop([c for c in wanted.columns if c != "sample_id"])
