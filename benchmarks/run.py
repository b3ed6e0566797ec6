"""Regenerate results files: one command over the benchmark scripts (issue 26: results are data, written by the
script that measured them). Every `benchmarks/bench_<name>.py` is a benchmark named <name>, found by itself; each
writes its own `benchmarks/results/*.json` (its docstring says which) with its default arguments.

    python3 benchmarks/run.py --list
    python3 benchmarks/run.py engine knn          # these, one after another (time benchmarks on an idle machine)
    python3 benchmarks/run.py --all               # every one: hours on 2 cores (Mercari, the AutoGluon baseline)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def benchmarks() -> dict[str, Path]:
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def main(argv: list[str] | None = None) -> int:
    known = benchmarks()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(known)}")
    parser.add_argument("--all", action="store_true", help="run every benchmark")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, path in known.items():
            print(f"{name:<20} {path.relative_to(HERE.parent)}")
        return 0
    names = list(known) if args.all else args.names
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(known)}" if unknown else
                     "name a benchmark, or --all")
    for name in names:
        start = time.perf_counter()
        print(f"== {name}: python3 {known[name].relative_to(HERE.parent)}", flush=True)
        done = subprocess.run([sys.executable, str(known[name])], cwd=HERE.parent)
        print(f"== {name}: exit {done.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
        if done.returncode:
            return done.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
