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

import json
import subprocess
import threading
import time
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


class _Served:
    """The predictor in service and what /version says about it, replaced whole by a reload."""

    def __init__(self, ctx: Context) -> None:
        self.predictor = Predictor(ctx.config, ctx.store())
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
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/version")
    def version() -> dict[str, Any]:
        return served["current"].version

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        frame, learners = _rows(await _json_body(request, max_body_bytes))
        current = served["current"]  # this request's model, whatever a reload does meanwhile
        out = await run_in_threadpool(current.predictor.predict, frame, "request", learners)
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
            served["current"] = fresh
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
