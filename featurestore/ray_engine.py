"""The Ray engine: the same units as the local engine, as Ray tasks (stateless units) and actors (encoders).

Imported only when `[engine] kind = "ray"`. `address = ""` starts a private local Ray of `num_cpus` cores; "auto" or
"host:port" joins a running cluster (`ray start --head` on one node, `ray start --address=<head>:6379` on the
others). A process that already has Ray initialised (the test suite's one shared local Ray) uses it as it is.

What each worker needs must import there: this package and any plug-in module (install the project on every node,
or start the cluster from a checkout on a shared filesystem). Image files are read by path: on a multi-node
cluster the image folder must be on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from threadpoolctl import threadpool_limits

from featurestore.config import EngineConfig
from featurestore.engine import _IN_WORKER, Engine, _run_unit, check_stage, stage_resources
from featurestore.errors import EngineError

log = logging.getLogger(__name__)

# A worker or its node died: retried by Ray up to `engine.retries` times, then reported as one line.
_DEATHS = (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError, ray.exceptions.NodeDiedError,
           ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.LocalRayletDiedError)


def _task(fn: Callable[[Any, Any, int], Any], shared: Any, unit: Any, threads: int) -> tuple[str, Any]:
    _IN_WORKER["on"] = True
    return ray.get_runtime_context().get_node_id(), _run_unit(fn, shared, unit, threads)


class _PartWorker:
    """One encoder per actor: the model loads once, then encodes part after part."""

    def __init__(self, worker_class: type, args: tuple[Any, ...], threads: int) -> None:
        _IN_WORKER["on"] = True
        self.threads = threads
        # An error while loading the model (a bad model name: a user error) is raised by the first `run`, where it
        # reaches the caller as itself; raised here, Ray would report a dead actor instead.
        self.error: BaseException | None = None
        try:
            self.worker = worker_class(*args, threads=threads)
        except Exception as exc:  # noqa: BLE001  re-raised, unchanged, by run()
            self.error = exc

    def run(self, part: Any) -> tuple[str, Any]:
        if self.error is not None:
            raise self.error
        with threadpool_limits(limits=self.threads):
            return ray.get_runtime_context().get_node_id(), self.worker(part)


class RayEngine(Engine):
    kind = "ray"

    def __init__(self, settings: EngineConfig) -> None:
        self.settings = settings
        # The engine reports the first failing unit itself (in unit order, as the local engine would); the errors
        # of sibling units it stopped waiting for are not news (Ray logged each as "Unhandled error" at exit).
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
        if not ray.is_initialized():
            private = settings.address == ""
            try:
                ray.init(address=None if private else settings.address,
                         num_cpus=(settings.num_cpus or None) if private else None,
                         include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EngineError(f"engine.address = {settings.address!r}: cannot start or join Ray ({exc}); start "
                                  "a cluster with `ray start --head`, or use address = \"\" for a private local "
                                  "Ray") from exc
        # node ids that ran units, per stage (the two-node test and the manifest read them)
        self.nodes: dict[str, set[str]] = {}
        # One actor pool at a time: two encoders building at once (a wave) could each hold some of the CPUs while
        # waiting for the rest for their other actors, and neither would finish.
        self._actor_pools = threading.Lock()

    def unit_threads(self, stage: str) -> int:
        return int(self._stage(stage).num_cpus)

    def _stage(self, stage: str) -> Any:
        check_stage(stage)
        return {"embed": self.settings.embed, "knn": self.settings.knn, "train": self.settings.train,
                "stack": self.settings.stack}[stage]

    def record(self, stage: str) -> dict[str, Any]:
        return {**super().record(stage), "address": self.settings.address or "private local",
                "nodes": len(self.nodes.get(stage, ())), "cluster_cpus": int(ray.cluster_resources().get("CPU", 0))}

    def _slots(self, stage: str) -> int:
        """How many units of `stage` the cluster can run at once (encoder actors to start)."""
        resources = ray.cluster_resources()
        spec = self._stage(stage)
        slots = int(resources.get("CPU", 1) // max(spec.num_cpus, 1))
        if spec.num_gpus:
            slots = min(slots, int(resources.get("GPU", 0) // spec.num_gpus))
        return max(1, slots)

    def _get(self, stage: str, ref: Any) -> Any:
        try:
            node, value = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if cause is None:
                raise
            # The unit's own exception, as the local engine would raise it (the CLI prints the same line); the
            # worker's traceback travels as a note for `--debug` and for bugs.
            remote = vars(exc).get("traceback_str") or str(exc)
            cause.add_note(f"raised in a Ray worker ({stage} stage):\n{remote}")
            raise cause from None
        except _DEATHS as exc:
            raise EngineError(f"a Ray worker died in the {stage} stage ({type(exc).__name__}) after "
                              f"{self.settings.retries} retries; nothing of the unfinished units was written: "
                              "rerun the command to resume") from exc
        self.nodes.setdefault(stage, set()).add(node)
        return value

    def map(self, stage: str, fn: Callable[[Any, Any, int], Any], units: Sequence[Any], shared: Any = None
            ) -> Iterator[Any]:
        if not units:
            return
        threads = self.unit_threads(stage)
        shared_ref = ray.put(shared)  # once per stage, never once per task
        # SPREAD: a stage's units are of one size (folds, kNN parts), so they go one per node first; the default
        # strategy packs short units onto the node that submits them and left a second node idle.
        remote = ray.remote(_task).options(**stage_resources(self._stage(stage)), max_retries=self.settings.retries,
                                           scheduling_strategy="SPREAD")
        futures = [remote.remote(fn, shared_ref, unit, threads) for unit in units]
        # When a unit fails, its siblings are left to finish and their results dropped: `ray.cancel` on tasks that
        # were finishing at that moment crashed Ray's core worker ("Tried to complete task that was not pending").
        for future in futures:
            yield self._get(stage, future)

    def map_parts(self, stage: str, worker_class: type, args: tuple[Any, ...], parts: Sequence[Any]
                  ) -> Iterator[Any]:
        if not parts:
            return
        with self._actor_pools:
            yield from self._map_parts(stage, worker_class, args, parts)

    def _map_parts(self, stage: str, worker_class: type, args: tuple[Any, ...], parts: Sequence[Any]
                   ) -> Iterator[Any]:
        threads = self.unit_threads(stage)
        actor = ray.remote(_PartWorker).options(**stage_resources(self._stage(stage)),
                                                max_restarts=self.settings.retries,
                                                max_task_retries=self.settings.retries,
                                                scheduling_strategy="SPREAD")
        actors = [actor.remote(worker_class, args, threads) for _ in range(min(len(parts), self._slots(stage)))]
        # Parts go round-robin to the actors (each runs its calls in order); results are read in part order.
        futures = [actors[i % len(actors)].run.remote(part) for i, part in enumerate(parts)]
        try:
            for future in futures:
                yield self._get(stage, future)
        finally:
            for handle in actors:
                ray.kill(handle)
