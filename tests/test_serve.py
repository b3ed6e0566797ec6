"""`serve` as a real server process over HTTP: its prices equal the batch `predict` bit for bit; bad requests get a
clear 4xx and leave the store byte-identical; a reload in the middle of a stream of requests drops none."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import polars as pl
import pytest

from featurestore.config import load_config
from pipeline.predict import predict_file
from pipeline.run import train_and_stack
from pipeline.serve import wait_until_up
from tests.conftest import ROOT, SAMPLE
from tests.test_models import FAST, build

SERVER = """
import json, sys
import models.registry, pipeline.registry
from featurestore.config import load_config
from pipeline.context import Context
from pipeline.serve import serve
serve(Context(load_config(None, json.loads(sys.argv[1]))), "127.0.0.1", int(sys.argv[2]), 10.0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _store_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".writer.lock"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict, Path]]:
    tmp = tmp_path_factory.mktemp("serve")
    pl.read_parquet(SAMPLE / "train.parquet").head(80).write_parquet(tmp / "train.parquet")
    pl.read_parquet(SAMPLE / "test.parquet").head(20).write_parquet(tmp / "test.parquet")
    values = {**FAST, "data.train": str(tmp / "train.parquet"), "data.test": str(tmp / "test.parquet"),
              "store.dir": str(tmp / "store"), "models.learners": ["lgbm", "ridge", "mlp_sparse"]}
    config = load_config(None, values)
    store = build(config)
    train_and_stack(config, store, trials=4, progress=False)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(values), str(port)], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, proc)
    try:
        yield url, values, tmp
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _records(path: Path) -> list[dict]:
    return pl.read_parquet(path).to_dicts()


def test_served_prices_equal_the_batch_predict_bit_for_bit(served) -> None:
    url, values, tmp = served
    config = load_config(None, values)
    from featurestore.store import FeatureStore

    batch = predict_file(config, FeatureStore(values["store.dir"], create=False), tmp / "test.parquet",
                         tmp / "batch.csv", progress=False)
    expected = dict(zip(batch["sample_id"].to_list(), batch["price"].to_list(), strict=True))
    rows = _records(tmp / "test.parquet")
    answer = httpx.post(f"{url}/predict", json=rows, timeout=60)
    assert answer.status_code == 200, answer.text
    got = {p["sample_id"]: p["price"] for p in answer.json()["predictions"]}
    assert got == expected  # floats read back from JSON are the same doubles
    for row in rows[:5]:  # one row per request: the same prices (no batch-mate moves a price)
        one = httpx.post(f"{url}/predict", json={"rows": [row], "learners": True}, timeout=60).json()
        assert one["predictions"][0]["price"] == expected[row["sample_id"]]
        assert set(one["predictions"][0]["learners"]) == {"lgbm", "ridge", "mlp_sparse"}
    version = httpx.get(f"{url}/version", timeout=10).json()
    assert version["learners"] == ["lgbm", "ridge", "mlp_sparse"] and version["metric"] == "smape"
    assert version["stack"] == answer.json()["stack"]


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{not json", 400, "not valid JSON"),
    (b"[]", 400, "non-empty JSON array"),
    (json.dumps([{"sample_id": 900001, "image_link": "x"}]).encode(), 400, "catalog_content"),
    (json.dumps([{"sample_id": 900001, "catalog_content": 12.5, "image_link": "x"}]).encode(), 400, "text"),
    (json.dumps([{"sample_id": 900001, "catalog_content": "a"}, {"sample_id": "x", "catalog_content": 3}]).encode(),
     400, "sample_id"),
    (json.dumps({"rows": [{"sample_id": 1}], "extra": 1}).encode(), 400, "unknown key"),
])
def test_bad_requests_get_a_clear_4xx_and_leave_the_store_byte_identical(served, body: bytes, status: int,
                                                                        message: str) -> None:
    url, values, _ = served
    before = _store_digest(Path(values["store.dir"]))
    answer = httpx.post(f"{url}/predict", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"], answer.json()
    assert "\n" not in answer.json()["detail"]
    assert _store_digest(Path(values["store.dir"])) == before


def test_a_training_id_a_large_body_and_writing_sql_are_refused(served) -> None:
    url, values, tmp = served
    before = _store_digest(Path(values["store.dir"]))
    train_row = pl.read_parquet(tmp / "train.parquet").head(1).drop("price").to_dicts()
    answer = httpx.post(f"{url}/predict", json=train_row, timeout=60)
    assert answer.status_code == 400 and "also in the train file" in answer.json()["detail"]
    big = b"[" + b",".join([json.dumps({"sample_id": 1, "catalog_content": "x" * 1000}).encode()] * 11_000) + b"]"
    assert len(big) > 10 * 2**20
    answer = httpx.post(f"{url}/predict", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 413 and "limit" in answer.json()["detail"]
    for query in ["DROP TABLE items", "COPY items TO 'x.csv'", "SELECT * FROM read_csv('/etc/passwd')"]:
        answer = httpx.post(f"{url}/sql", json={"query": query}, timeout=60)
        assert answer.status_code == 400, (query, answer.text)
    ok = httpx.post(f"{url}/sql", json={"query": "SELECT count(*) AS n FROM items", "limit": 5}, timeout=60)
    assert ok.status_code == 200 and ok.json() == {"columns": ["n"], "rows": [{"n": 100}]}
    assert _store_digest(Path(values["store.dir"])) == before


def test_a_reload_during_a_stream_of_requests_drops_none(served) -> None:
    url, _, tmp = served
    rows = _records(tmp / "test.parquet")
    expected = {p["sample_id"]: p["price"]
                for p in httpx.post(f"{url}/predict", json=rows, timeout=60).json()["predictions"]}
    failures: list[str] = []
    done = 0
    stop = threading.Event()

    def stream(offset: int) -> None:
        nonlocal done
        with httpx.Client(timeout=60) as client:
            i = offset
            while not stop.is_set():
                row = rows[i % len(rows)]
                answer = client.post(f"{url}/predict", json=[row])
                if answer.status_code != 200 or answer.json()["predictions"][0]["price"] != expected[row["sample_id"]]:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")
                done += 1
                i += 1

    threads = [threading.Thread(target=stream, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    for _ in range(2):
        reloaded = httpx.post(f"{url}/reload", timeout=120)
        assert reloaded.status_code == 200, reloaded.text
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join()
    assert done > 20 and not failures, failures[:3]


def test_concurrent_requests_are_batched_and_each_gets_its_own_price_or_error(served) -> None:
    """Requests sent at once are priced in shared batches (the server's counts show fewer batches than requests),
    yet each gets the price it gets alone, bit for bit; a bad request among them gets its own 4xx and fails no
    other; two requests with the same id are never put in one batch (both answered right)."""
    url, _, tmp = served
    rows = _records(tmp / "test.parquet")
    alone = {r["sample_id"]: httpx.post(f"{url}/predict", json=[r], timeout=60).json()["predictions"][0]["price"]
             for r in rows}
    bad = {"sample_id": 900_001, "catalog_content": 12.5, "image_link": "x"}
    sends = [[r] for r in rows] + [[rows[0]], [rows[1]], [bad], [rows[2], rows[3]]]
    before = httpx.get(f"{url}/health", timeout=10).json()
    answers: list[httpx.Response | None] = [None] * len(sends)
    start = threading.Barrier(len(sends))

    def send(i: int) -> None:
        start.wait()
        answers[i] = httpx.post(f"{url}/predict", json=sends[i], timeout=120)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(sends))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for sent, answer in zip(sends, answers, strict=True):
        assert answer is not None
        if sent == [bad]:
            assert answer.status_code == 400 and "text" in answer.json()["detail"], answer.text
            continue
        assert answer.status_code == 200, answer.text
        assert [p["price"] for p in answer.json()["predictions"]] == [alone[r["sample_id"]] for r in sent]
    after = httpx.get(f"{url}/health", timeout=10).json()
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests >= len(sends) and batches < requests, (requests, batches)
