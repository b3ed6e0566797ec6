"""What every results file records about its run, measured, not typed in: commit, date, the machine (cores,
memory, CPU model), library versions, and the threads the run actually used. Issue 26: results are data, written
by the script that measured them."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("polars", "duckdb", "lightgbm", "xgboost", "catboost", "torch", "onnxruntime", "faiss-cpu", "optuna",
             "ray")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        # Results files are what benchmarks write (a run that writes two entries sees its first one): not code.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return out.stdout.strip() + ("+uncommitted changes" if dirty else "")
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


CPU_CHECK = "sum(i * i for i in range(10**6)), one thread, best of 5"


def cpu_check_ms() -> float:
    """A fixed single-thread workload's time: two runs on machines that both call themselves "AMD EPYC", 2 cores,
    differed by 40% in every stage (an in-process 8-row serve batch 50 vs 70 ms), so each run records how fast its
    cores were when it started."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        sum(i * i for i in range(10**6))
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)


def run_facts(threads: dict[str, Any], command: str) -> dict[str, Any]:
    """`threads`: what the run gave each library or unit (not os.cpu_count())."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"command": command, "commit": _commit(), "date": datetime.now(UTC).replace(microsecond=0).isoformat(),
            "machine": {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "memory_gib": _memory_gib(),
                        "load_average_1min_at_start": load, "python": platform.python_version(),
                        "cpu_check": {"workload": CPU_CHECK, "ms": cpu_check_ms()}},
            "threads": threads, "versions": versions}
