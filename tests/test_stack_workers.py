"""Parallel stack workers must start cleanly after the parent has used OpenMP (LightGBM/torch): `stack` trains the
learners in-process first. Forked workers deadlocked there (the README's first command hung with idle workers)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import ROOT


def test_workers_start_after_openmp_in_the_parent() -> None:
    script = textwrap.dedent("""
        import sys; sys.path.insert(0, ".")
        import numpy as np, lightgbm as lgb
        from featurestore.config import Config
        from stacking.inputs import StackInputs
        from stacking.levels import run_levels
        rng = np.random.default_rng(0)
        x = rng.normal(size=(3000, 5)); y = x @ rng.normal(size=5)
        lgb.train({"num_threads": 2, "verbosity": -1}, lgb.Dataset(x, y), 20)  # OpenMP pool in the parent
        n = 600
        base = rng.normal(3, 1, (n, 2)); price = np.expm1(base.mean(axis=1) + rng.normal(0, .1, n))
        fold = np.arange(n) % 4; fold[-50:] = -1; price[fold < 0] = np.nan
        inputs = StackInputs(np.arange(n), fold, price, base, ["a", "b"], 2)
        result = run_levels(inputs, Config(), 8, None, "workers", workers=2)
        print("done", np.isfinite(result.test_pred).all())
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0 and "done True" in out.stdout, out.stderr[-2000:]
