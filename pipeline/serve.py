"""`python cli.py serve`: the stack over HTTP (FastAPI + uvicorn), loaded once.

Routes:
- `POST /predict`: a JSON array of rows in the data file's columns (or `{"rows": [...], "learners": true}`);
  returns `{"predictions": [{"sample_id", "price"[, "learners": {name: price}]}]}` through `Predictor`, the
  path `predict` takes, so a row's price is the CLI's bit for bit.
- `GET /health`, `GET /version` (the stack's key and meta-learner hash, learners, metric, nested CV score).
- `POST /sql`: `{"query": "SELECT ...", "limit": 100}`, read-only behind the `sql` command's guard and sandbox.
- `POST /reload`: loads the store's current stack beside the serving one and swaps it in one assignment;
  requests in flight finish on the model they started with, none fails.

Bad input gets a 4xx whose `detail` is the one line the CLI prints (row and column named); a body over the
limit gets 413 before it is read whole. A request never writes to the store (nothing here opens it for writing).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import polars as pl
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from featurestore.errors import MissingTable, StaleTable, UserError
from featurestore.store import FeatureStore
from pipeline.context import Context
from pipeline.online import Predictor

MAX_SQL_ROWS = 10_000


class _Job:
    def __init__(self, frame: pl.DataFrame, learners: bool, notify: Callable[[], None] | None = None) -> None:
        self.frame, self.learners = frame, learners
        self.done = threading.Event()
        self.notify = notify  # called on the batcher's thread once the result or error is set
        self.result: pl.DataFrame | None = None
        self.error: BaseException | None = None

    def finish(self) -> None:
        self.done.set()
        if self.notify is not None:
            self.notify()

    def outcome(self) -> pl.DataFrame:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class Batcher:
    """Requests that arrive while a prediction runs are priced together in the next one (adaptive batching, as
    model servers do it): one `Predictor.predict` call per batch instead of per request, so the per-call cost
    (model calls, frame operations) is paid once for all of them. A row's price does not depend on the other rows
    it is priced with (pipeline.online's guarantee), so a batched price is the one-request price bit for bit.

    Only requests that can share a frame go together: the same columns, each of one type or all-null, an id
    column present and no id in two of them. A batch that fails (one request's bad row) is run again request by
    request, so each request gets its own result or its own one-line error."""

    def __init__(self, predictor: Predictor, id_column: str, max_rows: int = 256, gather_ms: float = 10.0) -> None:
        self.predictor, self.id_column, self.max_rows = predictor, id_column, max_rows
        # Fewer requests waiting than there are clients about (those answered by the last batch plus those that
        # waited through it): wait up to gather_ms for the rest. Clients answered together send again a few ms
        # apart; without the wait the first to come back was priced alone and the others waited a whole batch
        # behind it (8 clients split into two alternating half batches). One client never waits.
        self.gather_s = gather_ms / 1000
        self._clients = 1
        self._queue: list[_Job] = []
        self._ready = threading.Condition()
        self.counts = {"requests": 0, "batches": 0}  # /health shows them: requests per batch says how much it helps
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="predict-batcher", daemon=True)
        self._worker.start()

    def predict(self, frame: pl.DataFrame, learners: bool = False) -> pl.DataFrame:
        """`Predictor.predict(frame, "request", learners)`, batched with whatever else is waiting (blocks)."""
        job = _Job(frame, learners)
        if not self._enqueue(job):  # a request that took this model just before a reload: priced alone, on it
            return self.predictor.predict(frame, "request", learners)
        job.done.wait()
        return job.outcome()

    async def predict_async(self, frame: pl.DataFrame, learners: bool = False) -> pl.DataFrame:
        """`predict` for the server's event loop: the request awaits a future that the batcher settles, instead of
        holding a pool thread that waits on an event (a batch of 8 woke 8 threads, which then took turns for the
        GIL to hand their answers back: ~1 ms of a round at 8 clients)."""
        loop = asyncio.get_running_loop()
        settled: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not settled.done():
                settled.set_result(None)

        job = _Job(frame, learners, lambda: loop.call_soon_threadsafe(settle))
        if not self._enqueue(job):  # just before a reload (see `predict`): priced alone, off the loop
            return await run_in_threadpool(self.predictor.predict, frame, "request", learners)
        await settled
        return job.outcome()

    def _enqueue(self, job: _Job) -> bool:
        """Queue `job` for the worker; False once the batcher is closed (the caller prices it alone, outside the
        lock, so the worker can finish what is queued meanwhile)."""
        with self._ready:
            if self._closed:
                return False
            self._queue.append(job)
            self._ready.notify()
            return True

    def close(self) -> None:
        """After a reload: the worker prices what is queued, then ends (so the old models can be freed)."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                deadline = time.monotonic() + self.gather_s
                while not self._closed and 0 < len(self._queue) < self._clients:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._ready.wait(left)
                if not self._queue:
                    return
                try:
                    batch = self._take()
                except Exception:  # noqa: BLE001  ids that do not read as text (a nested value): it goes alone
                    batch = [self._queue.pop(0)]
            self._run(batch)

    def _take(self) -> list[_Job]:
        """The first waiting job and every later one that can share its frame, up to max_rows (queue order)."""
        first = self._queue[0]
        batch, rows = [first], first.frame.height
        if self.id_column not in first.frame.columns:
            return [self._queue.pop(0)]
        ids = set(first.frame[self.id_column].cast(pl.String).to_list())
        for job in self._queue[1:]:
            if rows + job.frame.height > self.max_rows:
                break
            if not _same_shape(first.frame, job.frame):
                continue
            job_ids = job.frame[self.id_column].cast(pl.String).to_list()
            if ids.intersection(job_ids) or len(set(job_ids)) != len(job_ids):
                continue
            ids.update(job_ids)
            batch.append(job)
            rows += job.frame.height
        for job in batch:  # taken off the queue only once the batch is settled (a failure above leaves it whole)
            self._queue.remove(job)
        return batch

    def _run(self, batch: list[_Job]) -> None:
        try:
            self._price(batch)
        finally:
            with self._ready:  # counted before anyone is answered: an answered client's next request is not here yet
                self._clients = len(batch) + len(self._queue)
            for job in batch:
                job.finish()

    def _price(self, batch: list[_Job]) -> None:
        """Each job's result or error (the caller answers them)."""
        self.counts["requests"] += len(batch)
        self.counts["batches"] += 1
        if len(batch) > 1:
            try:
                out = self.predictor.predict(pl.concat([j.frame for j in batch], how="vertical_relaxed"), "request",
                                             any(j.learners for j in batch))
            except Exception:  # noqa: BLE001  one request's bad input: each runs alone below, for its own error
                out = None
            if out is not None and out.height == sum(j.frame.height for j in batch):
                start = 0
                for job in batch:
                    part = out.slice(start, job.frame.height)
                    job.result = part if job.learners else part.select("sample_id", "price")
                    start += job.frame.height
                return
        for job in batch:
            try:
                job.result = self.predictor.predict(job.frame, "request", job.learners)
            except Exception as exc:  # noqa: BLE001  handed to the request's thread, raised there
                job.error = exc


def _same_shape(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    """The same columns in the same order, each of one dtype or all-null in one of the two (a null-only JSON
    column is typed Null; concatenated, it takes the other's type, as a file with both rows would give)."""
    return a.columns == b.columns and all(x == y or x == pl.Null or y == pl.Null
                                          for x, y in zip(a.dtypes, b.dtypes, strict=True))


class _Served:
    """The predictor in service (behind its batcher) and what /version says about it, replaced whole by a
    reload: requests queued on the old batcher finish on the old predictor."""

    def __init__(self, ctx: Context) -> None:
        self.predictor = Predictor(ctx.config, ctx.store())
        self.batcher = Batcher(self.predictor, ctx.config.columns.id)
        record = self.predictor.record
        self.version = {"stack": record.study_key, "meta_sha256": record.meta_sha256, "meta": record.best_meta,
                        "learners": record.learners, "metric": record.metric, "stack_cv": record.stack_cv,
                        "nested": record.nested, "trials": record.trials,
                        "loaded_at": datetime.now(UTC).replace(microsecond=0).isoformat()}


class _BadRequest(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


async def _json_body(request: Request, limit: int) -> Any:
    """The parsed body; 413 past `limit` bytes (checked on the header, then while reading), 400 if not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _BadRequest(413, f"request body is {int(declared):,} bytes; the limit is {limit:,} (--max-body-mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _BadRequest(413, f"request body is over the limit of {limit:,} bytes (--max-body-mb)")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadRequest(400, f"the body is not valid JSON: {exc}") from None


def _rows(payload: Any) -> tuple[pl.DataFrame, bool]:
    """The request's rows as a frame (the data file's columns) and whether per-learner prices were asked for."""
    learners = False
    if isinstance(payload, dict):
        unknown = sorted(set(payload) - {"rows", "learners"})
        if unknown:
            raise _BadRequest(400, f"unknown key(s) {unknown}; expected {{\"rows\": [...], \"learners\": false}}")
        learners = payload.get("learners", False)
        if not isinstance(learners, bool):
            raise _BadRequest(400, "\"learners\" must be true or false")
        payload = payload.get("rows")
    if not isinstance(payload, list) or not payload or not all(isinstance(r, dict) for r in payload):
        raise _BadRequest(400, "expected a non-empty JSON array of rows (objects keyed by the data file's columns)")
    kinds: dict[str, dict[str, int]] = {}  # column -> JSON kind -> first row (1-based) holding it
    for number, row in enumerate(payload, start=1):
        for key, value in row.items():
            if value is not None:
                kind = "number" if isinstance(value, int | float) and not isinstance(value, bool) else \
                    type(value).__name__
                kinds.setdefault(key, {}).setdefault(kind, number)
    for key, seen in kinds.items():
        if len(seen) > 1:
            where = ", ".join(f"{kind} in row {row}" for kind, row in seen.items())
            raise _BadRequest(400, f"request: column {key!r} holds values of different types ({where}); expected "
                              "one type per column")
    try:
        return pl.DataFrame(payload, infer_schema_length=None), learners
    except (pl.exceptions.PolarsError, TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _BadRequest(400, f"rows: a column holds values of different types ({first})") from None


def make_app(ctx: Context, max_body_bytes: int = 10 * 2**20) -> FastAPI:
    """The app over `ctx`'s store; the stack is loaded here, once (a failure is the CLI's one-line error)."""
    app = FastAPI(title="pricestack", description="Price suggestions from the stacked learners.")
    served = {"current": _Served(ctx)}
    reload_lock = threading.Lock()

    @app.exception_handler(_BadRequest)
    async def _bad_request(_: Request, exc: _BadRequest) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(UserError)
    async def _user_error(_: Request, exc: UserError) -> JSONResponse:
        status = 409 if isinstance(exc, StaleTable) else 404 if isinstance(exc, MissingTable) else 400
        return JSONResponse({"detail": " ".join(str(exc).split())}, status_code=status)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", **served["current"].batcher.counts}

    @app.get("/version")
    def version() -> dict[str, Any]:
        return served["current"].version

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        frame, learners = _rows(await _json_body(request, max_body_bytes))
        current = served["current"]  # this request's model, whatever a reload does meanwhile
        out = await current.batcher.predict_async(frame, learners)
        rows = []
        for row in out.iter_rows(named=True):
            item: dict[str, Any] = {"sample_id": row["sample_id"], "price": row["price"]}
            if learners:
                item["learners"] = {n: row[f"pred_{n}"] for n in current.version["learners"]}
            rows.append(item)
        # json.dumps writes floats with repr: the client reads back the very doubles the CLI writes.
        return Response(json.dumps({"predictions": rows, "stack": current.version["stack"]}),
                        media_type="application/json")

    @app.post("/sql")
    async def sql(request: Request) -> Response:
        payload = await _json_body(request, max_body_bytes)
        if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
            raise _BadRequest(400, "expected {\"query\": \"SELECT ...\", \"limit\": 100}")
        limit = payload.get("limit", 100)
        if not isinstance(limit, int) or not 1 <= limit <= MAX_SQL_ROWS:
            raise _BadRequest(400, f"\"limit\" must be an integer from 1 to {MAX_SQL_ROWS:,}")
        import duckdb

        from sql.readonly import run_query

        try:
            frame = run_query(FeatureStore(ctx.root, create=False), payload["query"], limit=limit)
        except duckdb.Error as exc:  # the query's own fault (a typo, a refused file access): the CLI's one line
            raise _BadRequest(400, f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}") from None
        return Response('{"columns": ' + json.dumps(frame.columns) + ', "rows": ' + frame.write_json() + "}",
                        media_type="application/json")

    @app.post("/reload")
    def reload() -> dict[str, Any]:
        with reload_lock:  # one load at a time; serving goes on meanwhile
            fresh = _Served(ctx)
            old, served["current"] = served["current"], fresh
            old.batcher.close()
        return fresh.version

    return app


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Poll `GET /health` of a server `process` started until it answers 200 (for scripts and tests that start
    one); an exited process or a timeout is an error. Needs httpx (the `dev` extra)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited at start-up (code {process.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server at {url} did not answer /health within {timeout_s:.0f} s")
        time.sleep(0.2)


def serve(ctx: Context, host: str, port: int, max_body_mb: float) -> None:
    import uvicorn

    app = make_app(ctx, int(max_body_mb * 2**20))
    uvicorn.run(app, host=host, port=port, log_level="warning", workers=1)
