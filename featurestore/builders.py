"""The feature-builder protocol and the runner that makes builds incremental.

A builder writes exactly one table. Its fingerprint hashes its code version, its parameters, the fingerprints of
the tables it reads and any outside input (raw files), so an unchanged build is reused and any change upstream
rebuilds everything downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import polars as pl

from featurestore.budget import Budget
from featurestore.config import Config, apply_settings
from featurestore.engine import Engine, engine_for
from featurestore.errors import ConfigError, MissingTable, StaleTable
from featurestore.fingerprint import code_hash
from featurestore.store import FeatureStore, Timer, file_fingerprint

log = logging.getLogger(__name__)


@dataclass
class BuildContext:
    store: FeatureStore
    config: Config
    progress: bool = True
    # Set by the runner for the build in progress: builders key their resumable scratch files on it.
    fingerprint: str = ""
    # Where the builders' loops run ([engine]); one per command, made from the config when not given.
    engine: Engine = None  # type: ignore[assignment]
    # `--time-limit`: a builder that checks it between its units (cross-fitting, between folds) stops with
    # featurestore.budget.OverBudget when the rest would end past the deadline; None = no limit.
    budget: Budget | None = None

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = engine_for(self.config)


@dataclass
class OnlineRows:
    """New rows on their way through the builders' online paths (pipeline.online): the raw rows as given (the
    data file's columns), where they came from (named in errors: a file, or "request"), and the tables computed
    for them so far."""

    raw: pl.DataFrame
    source: str
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)


def in_row_order(items: pl.DataFrame, table: pl.DataFrame) -> pl.DataFrame:
    """`table`'s rows in `items`' order, one each (null where it has none), as a left join gives them. Online
    builders mostly return their rows in that order already: then the table itself (a join per table per request
    was a fifth of a one-row prediction)."""
    ids = items["sample_id"]
    if table.height == items.height and table["sample_id"].equals(ids):
        return table
    rows = items.select("sample_id").join(table, on="sample_id", how="left", maintain_order="left")
    if rows.height != items.height:
        raise StaleTable(f"a table of {table.height} rows gave {rows.height} for {items.height} new rows: it repeats "
                         "ids; its builder's online path must give one row per id")
    return rows


@dataclass
class Built:
    """What a build returns: its table and its manifest extras (what it measured or wrote while building)."""

    table: pl.DataFrame
    extra: dict[str, Any] = field(default_factory=dict)


class _Section:
    """One config section as a builder sees it: only the keys it declared."""

    def __init__(self, section: object, keys: set[str], where: str, owner: str) -> None:
        self._section, self._keys, self._where, self._owner = section, keys, where, owner

    def __getattr__(self, key: str) -> Any:
        keys = self.__dict__.get("_keys")
        if keys is None or key.startswith("__"):  # unpickling (a copy sent to a worker) looks up dunders first
            raise AttributeError(key)
        if key not in keys:
            raise AttributeError(f"{self._owner} reads config.{self._where}.{key} without declaring it; add "
                                 f"'{self._where}.{key}' to {self._owner}.reads so its fingerprint covers it")
        return getattr(self._section, key)


class ConfigView:
    """The part of a Config one builder may read: the sections and keys named in its `reads`. Reading anything
    else raises, naming the fix, so a setting a builder reads cannot be left out of its fingerprint (the default
    `params()` hashes exactly what is declared). Helpers handed the view (`threads(config)`) are held to it too."""

    def __init__(self, config: Config, reads: tuple[str, ...], owner: str) -> None:
        self._config, self._owner = config, owner
        self._sections: dict[str, set[str] | None] = {}
        for read in reads:
            section, _, key = read.partition(".")
            if not hasattr(config, section) or (key and not hasattr(getattr(config, section), key)):
                raise ConfigError(f"{owner}.reads names {read!r}, which is not a config setting")
            if not key:
                self._sections[section] = None
            elif self._sections.get(section, set()) is not None:
                self._sections.setdefault(section, set()).add(key)  # type: ignore[union-attr]

    def __getattr__(self, section: str) -> Any:
        sections = self.__dict__.get("_sections")
        if sections is None or section.startswith("__"):  # unpickling looks up dunders before __dict__ is set
            raise AttributeError(section)
        if section not in sections:
            raise AttributeError(f"{self._owner} reads config.{section} without declaring it; add '{section}' (or "
                                 f"'{section}.<key>') to {self._owner}.reads so its fingerprint covers it")
        keys = sections[section]
        value = getattr(self._config, section)
        return value if keys is None else _Section(value, keys, section, self._owner)


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


class FeatureBuilder(ABC):
    """One table. Subclasses set `table`, `version`, `inputs`, `reads` and implement `build`.

    The builder is handed only the config it declares in `reads` ("section" or "section.key"); its default
    `params()` (what the fingerprint hashes) is exactly those values, less the `not_fingerprinted` ones, which
    change how a table is computed, never what it holds (worker counts, cache folders). A builder with its own
    section (a plug-in) sets `settings_type`, a dataclass; `[features.<name>]` is validated into it at load
    and handed over as `self.settings`, hashed whole. Subclasses add their own identity (a model name, a kNN
    space) by extending `params()`."""

    table: str
    version: str = "1"
    inputs: tuple[str, ...] = ()
    # Libraries whose versions the manifest records for this table, beyond the store's defaults.
    extra_versions: tuple[str, ...] = ()
    # The registry key (`builders = [...]`) of a builder registered with `register_builder`.
    name: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    not_fingerprinted: ClassVar[tuple[str, ...]] = ()
    settings_type: ClassVar[type | None] = None

    def __init__(self, config: Config) -> None:
        owner = type(self).__name__
        self.config: Config = ConfigView(config, self.reads, owner)  # type: ignore[assignment]
        self.settings: Any = None
        if self.settings_type is not None:
            raw = config.features.sections.get(self.name, {})
            self.settings = apply_settings(self.settings_type(), raw, f"features.{self.name}")

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for read in self.reads:
            if read in self.not_fingerprinted:
                continue
            value = _plain(getattr(self.config, read.partition(".")[0]))
            if "." in read:
                value = _plain(getattr(value, read.partition(".")[2]))
            elif isinstance(value, dict):
                value = {k: v for k, v in value.items() if f"{read}.{k}" not in self.not_fingerprinted}
            out[read] = value
        if self.settings is not None:
            out["settings"] = dataclasses.asdict(self.settings)
        return out

    def code_sources(self) -> tuple[object, ...]:
        """Classes or modules whose source the table depends on; editing any of them rebuilds the table."""
        return (type(self),)

    def external_fingerprint(self) -> str:
        """Hash of anything read from outside the store (raw files, model weights). Empty when none."""
        return ""

    @abstractmethod
    def build(self, ctx: BuildContext) -> Built: ...

    def artifacts_ok(self, store: FeatureStore, fingerprint: str) -> bool:
        """Files a build writes beside its table (saved models); a fresh table without them is rebuilt."""
        return True

    # -- new rows without a store (pipeline.online: `predict`, `serve`) ---------------------------------------
    # `online_state(trained, threads)` loads, once, what pricing new rows needs from the trained store (a vocabulary, an
    # encoder, the training rows' vectors and prices). `online(state, rows)` returns this table's rows for the
    # new rows only, given their tables computed so far (`rows.tables`, in build order; "items" first). A new
    # row's values must be what `build` gives a test row, and must not depend on the other new rows: a price
    # never moves with its batch-mates. Builders without an online path leave `supports_online` False.
    supports_online: ClassVar[bool] = False

    def online_state(self, trained: FeatureStore, threads: int) -> Any:
        return None

    def online(self, state: Any, rows: OnlineRows) -> pl.DataFrame:
        raise NotImplementedError(f"{type(self).__name__} has no online path")


def fingerprint_inputs(builder: FeatureBuilder, store: FeatureStore,
                       upstream: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything the table's fingerprint hashes. `upstream` overrides the manifest's fingerprints of input
    tables with what they would be now (see `stale_tables`)."""
    fingerprints = {}
    for name in builder.inputs:
        if upstream is not None and name in upstream:
            fingerprints[name] = upstream[name]
            continue
        info = store.info(name)
        if info is None:
            raise MissingTable(f"builder for '{builder.table}' needs table '{name}', which is not built yet")
        fingerprints[name] = info.fingerprint
    return {
        "table": builder.table,
        "builder": type(builder).__name__,
        "version": builder.version,
        # The builder's module source: editing the parsing code rebuilds its table without a manual bump.
        "code": code_hash(builder.code_sources()),
        "params": builder.params(),
        "upstream": fingerprints,
        "external": builder.external_fingerprint(),
    }


def _hash_inputs(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _why_changed(before: dict[str, Any], now: dict[str, Any]) -> str:
    if not before:
        return "it was built by an older version of this tool"
    before = json.loads(json.dumps(before, default=str))
    now = json.loads(json.dumps(now, sort_keys=True, default=str))
    reasons = []
    changed = sorted(n for n in now["upstream"] if before.get("upstream", {}).get(n) != now["upstream"][n])
    if changed:
        reasons.append(f"input table(s) {', '.join(changed)} changed since it was built")
    if before.get("external") != now["external"]:
        reasons.append("its input files changed since it was built")
    if before.get("params") != now["params"]:
        keys = sorted(k for k in set(now["params"]) | set(before.get("params", {}))
                      if now["params"].get(k) != before.get("params", {}).get(k))
        reasons.append(f"its settings changed ({', '.join(keys)})")
    if before.get("code") != now["code"] or before.get("version") != now["version"]:
        reasons.append("its builder's code changed")
    return "; ".join(reasons) or "its inputs changed"


def stale_tables(store: FeatureStore, builders: list[FeatureBuilder], tables: set[str]) -> dict[str, str]:
    """Tables among `tables` (and what they read, transitively) whose stored fingerprint is not what their
    builder would compute now, with the reason. A change propagates: after `ingest` of a new train file,
    `folds` is stale because `items` changed, and `knn__x` because `folds` would change. Tables no builder
    here makes, or not in the store, are left to the commands that read them."""
    by_table = {b.table: b for b in builders}
    expected: dict[str, str] = {}
    stale: dict[str, str] = {}

    def visit(name: str) -> None:
        builder = by_table.get(name)
        info = None if name in expected or builder is None else store.info(name)
        if info is None:
            return
        for upstream in builder.inputs:
            visit(upstream)
        now = fingerprint_inputs(builder, store, expected)
        expected[name] = _hash_inputs(now)
        if info.fingerprint != expected[name]:
            stale[name] = _why_changed(info.inputs, now)
        elif not store.table_path(name).is_file() or file_fingerprint(store.table_path(name)) != info.fingerprint:
            stale[name] = "its file does not match its manifest row (a crash between writing and recording it?)"

    for name in sorted(tables):
        visit(name)
    return stale


@dataclass
class BuildResult:
    table: str
    status: str  # "built" or "reused"
    seconds: float
    rows: int


def run_builders(ctx: BuildContext, builders: list[FeatureBuilder], force: bool = False) -> list[BuildResult]:
    """Build the stale tables among `builders`, in order, and record each in the manifest.

    On a distributed engine, builders that do not read each other's tables build at once (a wave: the learners,
    or the text and image encoders), each submitting its units to the engine; the main process still writes every
    table itself, in `builders` order, after the wave. The local engine keeps the plain loop."""
    if ctx.engine.kind == "local":
        return [_write(ctx, builder, *_build(ctx, builder, force)) for builder in builders]
    results: dict[str, BuildResult] = {}
    pending = list(builders)
    while pending:
        later = {b.table for b in pending}
        wave = [b for b in pending if not (set(b.inputs) & (later - {b.table}))] or pending[:1]
        with ThreadPoolExecutor(max_workers=len(wave), thread_name_prefix="build") as pool:
            outcomes = list(pool.map(lambda b: _build(ctx, b, force), wave))
        for builder, outcome in zip(wave, outcomes, strict=True):
            results[builder.table] = _write(ctx, builder, *outcome)
        pending = [b for b in pending if b not in wave]
    return [results[b.table] for b in builders]


def up_to_date(store: FeatureStore, builder: FeatureBuilder) -> bool:
    """The stored table (and its artifacts) is what the builder would build now: running it would reuse it."""
    fingerprint = _hash_inputs(fingerprint_inputs(builder, store))
    return store.is_fresh(builder.table, fingerprint) and builder.artifacts_ok(store, fingerprint)


def _build(ctx: BuildContext, builder: FeatureBuilder, force: bool
           ) -> tuple[dict[str, Any], str, Built | None, float]:
    """The build of one table (no store write): its fingerprint inputs, fingerprint, and the built table, or
    None when the stored one is up to date."""
    inputs = fingerprint_inputs(builder, ctx.store)
    fingerprint = _hash_inputs(inputs)
    fresh = ctx.store.is_fresh(builder.table, fingerprint) and builder.artifacts_ok(ctx.store, fingerprint)
    if not force and fresh:
        log.info("%s: up to date (fingerprint %s), reused", builder.table, fingerprint)
        return inputs, fingerprint, None, 0.0
    log.info("%s: building", builder.table)
    with Timer() as timer:
        built = builder.build(replace(ctx, fingerprint=fingerprint))
    return inputs, fingerprint, built, timer.seconds


def _write(ctx: BuildContext, builder: FeatureBuilder, inputs: dict[str, Any], fingerprint: str,
           built: Built | None, seconds: float) -> BuildResult:
    if built is None:
        info = ctx.store.info(builder.table)
        assert info is not None
        return BuildResult(builder.table, "reused", 0.0, info.row_count)
    table = built.table
    ctx.store.write(
        builder.table,
        table,
        builder=type(builder).__name__,
        params=builder.params(),
        fingerprint=fingerprint,
        seconds=seconds,
        extra=built.extra,
        extra_versions=builder.extra_versions,
        inputs=inputs,
    )
    log.info("%s: %d rows in %.1fs", builder.table, table.height, seconds)
    return BuildResult(builder.table, "built", seconds, table.height)
