"""Where the batch loops run: one code path, two engines.

The builders, cross-fitting and the stack hand their loop to an engine as a list of independent units, in order:
- `map(stage, fn, units, shared)`: `fn(shared, unit, threads)` per unit, stateless (kNN folds, (learner, fold)
  fits, stack candidate chunks). `shared` (the big arrays) goes into Ray's object store once per stage;
- `map_parts(stage, worker_class, args, parts)`: `worker_class(*args, threads=t)` is built once per worker (a
  model load) and called on each part (text and image encoding).
Both yield results in unit order, as they arrive, so the caller (the main process, the only writer of the store)
persists each one before the next and reduces in a fixed order (bit-identical sums).

`LocalEngine` runs them here, one after another: today's loops. `RayEngine` (`[engine] kind = "ray"`) runs them
as Ray tasks and actors; `ray` is imported only there. An engine changes speed, never results: a unit gets its
thread count from its stage (`[engine.<stage>] num_cpus`; the local engine uses `models.threads`) and pins every
library to it (BLAS here; ORT, torch, LightGBM and faiss in the unit), so equal threads per unit give the same
bits under both engines. Errors raised in a unit reach the caller as themselves (never wrapped); a worker that
dies is retried `engine.retries` times, then the command stops with one line (EngineError).

Workers never open the store: a unit runs with `in_worker()` true, and `FeatureStore` refuses to open its
DuckDB file or write a table there.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from threadpoolctl import threadpool_limits

from featurestore.config import Config, StageConfig
from featurestore.errors import EngineError

log = logging.getLogger(__name__)

STAGES = ("embed", "knn", "train", "stack")
_IN_WORKER = {"on": False}


def in_worker() -> bool:
    """True inside a unit run by a Ray worker (the store guard reads it)."""
    return _IN_WORKER["on"]


def _run_unit(fn: Callable[[Any, Any, int], Any], shared: Any, unit: Any, threads: int) -> Any:
    with threadpool_limits(limits=threads):
        return fn(shared, unit, threads)


class Engine(ABC):
    kind: str = ""

    @abstractmethod
    def unit_threads(self, stage: str) -> int:
        """Threads the libraries inside one unit of `stage` get."""

    @abstractmethod
    def map(self, stage: str, fn: Callable[[Any, Any, int], Any], units: Sequence[Any], shared: Any = None
            ) -> Iterator[Any]: ...

    @abstractmethod
    def map_parts(self, stage: str, worker_class: type, args: tuple[Any, ...], parts: Sequence[Any]
                  ) -> Iterator[Any]: ...

    def record(self, stage: str) -> dict[str, Any]:
        """What ran a stage, for the manifest's `extra` (never a fingerprint)."""
        return {"kind": self.kind, "threads_per_unit": self.unit_threads(stage)}


class LocalEngine(Engine):
    """This process, one unit after another: the loops as they always were."""

    kind = "local"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def unit_threads(self, stage: str) -> int:
        return self.threads

    def map(self, stage: str, fn: Callable[[Any, Any, int], Any], units: Sequence[Any], shared: Any = None
            ) -> Iterator[Any]:
        for unit in units:
            yield _run_unit(fn, shared, unit, self.threads)

    def map_parts(self, stage: str, worker_class: type, args: tuple[Any, ...], parts: Sequence[Any]
                  ) -> Iterator[Any]:
        if not parts:
            return
        worker = worker_class(*args, threads=self.threads)
        for part in parts:
            with threadpool_limits(limits=self.threads):
                yield worker(part)


def engine_for(config: Config) -> Engine:
    """The engine `[engine]` asks for. The local engine's threads are `models.threads` (0 = every core)."""
    if config.engine.kind == "ray":
        try:
            from featurestore.ray_engine import RayEngine
        except ImportError as exc:
            raise EngineError(f"engine.kind = \"ray\" needs Ray ({exc}); install it with "
                              "`pip install -e \".[ray]\"`, or use engine.kind = \"local\"") from exc
        return RayEngine(config.engine)
    return LocalEngine(config.models.threads or os.cpu_count() or 1)


def stage_resources(stage: StageConfig) -> dict[str, Any]:
    """Ray's resource options for one unit of a stage."""
    options: dict[str, Any] = {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus}
    if stage.memory_mb:
        options["memory"] = stage.memory_mb * 1024 * 1024
    return options


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise EngineError(f"unknown engine stage {stage!r}; known: {', '.join(STAGES)}")
