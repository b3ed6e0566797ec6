"""The feature-builder protocol and the runner that makes builds incremental.

A builder writes exactly one table. Its fingerprint hashes its code version, its parameters, the fingerprints of
the tables it reads and any outside input (raw files), so an unchanged build is reused and any change upstream
rebuilds everything downstream of it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl

from featurestore.config import Config
from featurestore.store import FeatureStore, Timer

log = logging.getLogger(__name__)


@dataclass
class BuildContext:
    store: FeatureStore
    config: Config
    progress: bool = True
    # Set by the runner for the build in progress: builders key their resumable scratch files on it.
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # A store whose row-wise tables (embeddings) may be reused for unchanged rows: `predict` derives its store
    # from the training store this way.
    parent: FeatureStore | None = None


class FeatureBuilder(ABC):
    """One table. Subclasses set `table`, `version`, `inputs` and implement `params` and `build`."""

    table: str
    version: str = "1"
    inputs: tuple[str, ...] = ()
    # Libraries whose versions the manifest records for this table, beyond the store's defaults.
    extra_versions: tuple[str, ...] = ()

    def params(self) -> dict[str, Any]:
        return {}

    def code_sources(self) -> tuple[object, ...]:
        """Classes or modules whose source the table depends on; editing any of them rebuilds the table."""
        return (type(self),)

    def external_fingerprint(self) -> str:
        """Hash of anything read from outside the store (raw files, model weights). Empty when none."""
        return ""

    @abstractmethod
    def build(self, ctx: BuildContext) -> pl.DataFrame: ...

    def manifest_extra(self, ctx: BuildContext, table: pl.DataFrame) -> dict[str, Any]:
        return {}

    def artifacts_ok(self, store: FeatureStore, fingerprint: str) -> bool:
        """Files a build writes beside its table (saved models); a fresh table without them is rebuilt."""
        return True


def _module_source_hash(sources: tuple[object, ...]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        digest.update(Path(inspect.getfile(source)).read_bytes())  # type: ignore[arg-type]
    return digest.hexdigest()[:12]


def fingerprint_of(builder: FeatureBuilder, store: FeatureStore) -> str:
    upstream = {}
    for name in builder.inputs:
        info = store.info(name)
        if info is None:
            raise RuntimeError(f"builder for '{builder.table}' needs table '{name}', which is not built yet")
        upstream[name] = info.fingerprint
    payload = {
        "table": builder.table,
        "builder": type(builder).__name__,
        "version": builder.version,
        # The builder's module source: editing the parsing code rebuilds its table without a manual bump.
        "code": _module_source_hash(builder.code_sources()),
        "params": builder.params(),
        "upstream": upstream,
        "external": builder.external_fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class BuildResult:
    table: str
    status: str  # "built" or "reused"
    seconds: float
    rows: int


def run_builders(ctx: BuildContext, builders: list[FeatureBuilder], force: bool = False) -> list[BuildResult]:
    results = []
    for builder in builders:
        fingerprint = fingerprint_of(builder, ctx.store)
        fresh = ctx.store.is_fresh(builder.table, fingerprint) and builder.artifacts_ok(ctx.store, fingerprint)
        if not force and fresh:
            info = ctx.store.info(builder.table)
            assert info is not None
            log.info("%s: up to date (fingerprint %s), reused", builder.table, fingerprint)
            results.append(BuildResult(builder.table, "reused", 0.0, info.row_count))
            continue
        log.info("%s: building", builder.table)
        with Timer() as timer:
            table = builder.build(replace(ctx, fingerprint=fingerprint))
        ctx.store.write(
            builder.table,
            table,
            builder=type(builder).__name__,
            params=builder.params(),
            fingerprint=fingerprint,
            seconds=timer.seconds,
            extra=builder.manifest_extra(ctx, table),
            extra_versions=builder.extra_versions,
        )
        log.info("%s: %d rows in %.1fs", builder.table, table.height, timer.seconds)
        results.append(BuildResult(builder.table, "built", timer.seconds, table.height))
    return results
