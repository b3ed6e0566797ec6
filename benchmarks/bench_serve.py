"""Benchmark: `python cli.py serve` under load, through HTTP as a client would call it.

Starts the server on a trained store (a real process, `cli.py serve`), then sends single-row `POST /predict`
requests from 1, 8 and 32 concurrent clients (httpx, one thread each) and 100-row batches; records p50/p99
latency, rows/s, errors, how many requests the server priced per batch, and the server's memory (VmRSS/VmHWM
from /proc). Rows are the store's own test file
(new rows to the store: none is a training row). Clients and server share this machine's cores.

    python3 benchmarks/bench_serve.py [--name amazon_sample --config configs/default.toml --store store]
    python3 benchmarks/bench_serve.py --name mercari --config configs/mercari.toml --store store_mercari \
        --requests-one-client 1000

Results: benchmarks/results/serve.json, one entry per --name (each one run, with its run facts).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.facts import run_facts  # noqa: E402
from featurestore.config import load_config  # noqa: E402
from featurestore.devices import threads  # noqa: E402
from pipeline.serve import wait_until_up  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mib(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def _load(url: str, rows: list[dict], clients: int, requests: int, batch: int) -> dict:
    """`requests` requests of `batch` rows each, spread over `clients` threads; latency per request."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(timeout=120) as session:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = [rows[(i * batch + j) % len(rows)] for j in range(batch)]
                started = time.perf_counter()
                answer = session.post(f"{url}/predict", json=body)
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if answer.status_code != 200 or len(answer.json()["predictions"]) != batch:
                        errors.append(f"{answer.status_code}: {answer.text[:200]}")

    before = httpx.get(f"{url}/health", timeout=10).json()
    started = time.perf_counter()
    pool = [threading.Thread(target=client) for _ in range(clients)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - started
    after = httpx.get(f"{url}/health", timeout=10).json()
    ms = np.array(latencies) * 1000
    return {"clients": clients, "rows_per_request": batch, "requests": requests, "errors": len(errors),
            "first_errors": errors[:3], "wall_s": round(wall, 2), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "rows_per_s": round(requests * batch / wall, 1),
            # The server prices requests that wait together in one batch (pipeline.serve.Batcher).
            "requests_per_batch": round((after["requests"] - before["requests"])
                                        / max(after["batches"] - before["batches"], 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="amazon_sample", help="entry in serve.json (e.g. amazon_sample, mercari)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.toml")
    parser.add_argument("--store", default=None, help="store folder (default: the config's store.dir)")
    parser.add_argument("--requests", type=int, default=5000, help="single-row requests per concurrency level")
    parser.add_argument("--requests-one-client", type=int, default=None,
                        help="single-row requests at 1 client (default: --requests); one client waits for each")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batches", type=int, default=50, help="100-row requests (one client)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve.json")
    args = parser.parse_args()
    config = load_config(args.config, {"store.dir": args.store})
    rows = pl.read_parquet(config.data.test) if config.data.test.endswith(".parquet") else pl.read_csv(
        config.data.test)
    records = rows.to_dicts()
    port = _free_port()
    command = [sys.executable, str(ROOT / "cli.py"), "serve", "--config", str(args.config), "--port", str(port),
               "-q", *(["--store", args.store] if args.store else [])]
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, server)
        startup = round(time.perf_counter() - started, 1)
        _load(url, records, 1, 20, 1)  # warm-up, not recorded
        result = {**run_facts({"server": f"models.threads = {config.models.threads} -> {threads(config)}",
                               "clients": "one thread per client, same machine"},
                              "python3 benchmarks/bench_serve.py " + " ".join(sys.argv[1:])),
                  "store": str(Path(config.store.dir)), "config": str(args.config), "rows_available": len(records),
                  "startup_s": startup, "version": httpx.get(f"{url}/version", timeout=10).json(),
                  "single_row": [], "batch_100": None}
        for clients in args.clients:
            count = args.requests_one_client if clients == 1 and args.requests_one_client else args.requests
            level = _load(url, records, clients, count, 1)
            result["single_row"].append(level)
            print(json.dumps(level), flush=True)
        result["batch_100"] = _load(url, records, 1, args.batches, 100)
        print(json.dumps(result["batch_100"]), flush=True)
        result["server_memory_mib"] = _memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.name] = result
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} [{args.name}]")


if __name__ == "__main__":
    main()
