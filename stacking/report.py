"""`python cli.py report`: one self-contained HTML page (PNG charts inlined) about the last stack run.

The task's metric for each base learner, the mean blend and the stack (all out of fold); the metric by
true-value band; the feature importance every learner records (gain for the GBDTs, mean over folds); predicted
vs true prices of the stack's out-of-fold predictions.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from featurestore.errors import MissingTable  # noqa: E402
from featurestore.names import STACK_OOF, oof_table  # noqa: E402
from featurestore.store import FeatureStore, atomic_write  # noqa: E402
from models.metrics import metric  # noqa: E402
from models.train import TrainedLearner  # noqa: E402
from stacking.record import StackRecord  # noqa: E402


def _png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
                   for row in frame.iter_rows())
    return f"<table><tr>{head}</tr>{rows}</table>"


def _fmt(value: object) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def oof_predictions(store: FeatureStore, learners: list[str]) -> pl.DataFrame:
    """Train rows: true price and every learner's and the stack's out-of-fold price."""
    frame = store.read("items", columns=["sample_id", "price"]).filter(pl.col("price").is_not_null())
    for name in learners:
        oof = store.read(oof_table(name), columns=["sample_id", "pred_price"]).rename({"pred_price": name})
        frame = frame.join(oof, on="sample_id", how="inner")
    stack = store.read(STACK_OOF, columns=["sample_id", "pred_price"]).rename({"pred_price": "stack"})
    return frame.join(stack, on="sample_id", how="inner").sort("sample_id")


def build_report(store: FeatureStore, out: Path, bands: int = 5) -> Path:
    if not store.has_table(STACK_OOF):
        raise MissingTable(f"no stack in {store.root}; run `python cli.py stack` first")
    record = StackRecord.of(store)
    learners = list(record.learners)
    name_of_metric = record.metric.upper()
    score = metric(record.metric).score
    frame = oof_predictions(store, learners)
    models = [*learners, "stack"]
    price = frame["price"].to_numpy()

    scores = pl.DataFrame({"model": [*learners, "mean blend", "stack"],
                           "cv": [*record.base_cv.values(), record.mean_blend_cv, record.stack_cv]})
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh(scores["model"].to_list(), scores["cv"].to_list(), color="#4c72b0")
    ax.set_xlabel(f"out-of-fold {name_of_metric}")
    ax.invert_yaxis()
    score_chart = _png(fig)

    edges = np.quantile(price, np.linspace(0, 1, bands + 1))
    band = np.clip(np.searchsorted(edges, price, side="right") - 1, 0, bands - 1)
    by_band = {"price band": [f"{edges[b]:.2f}-{edges[b + 1]:.2f}" for b in range(bands)],
               "rows": [int((band == b).sum()) for b in range(bands)]}
    for name in models:
        pred = frame[name].to_numpy()
        by_band[name] = [score(price[band == b], pred[band == b]) for b in range(bands)]
    band_table = pl.DataFrame(by_band)
    fig, ax = plt.subplots(figsize=(6, 3))
    for name in models:
        ax.plot(range(bands), band_table[name].to_list(), marker="o", label=name)
    ax.set_xticks(range(bands), band_table["price band"].to_list(), rotation=20, fontsize=7)
    ax.set_ylabel(name_of_metric)
    ax.legend(fontsize=7)
    band_chart = _png(fig)

    importance_html = []
    for name in learners:  # every learner that records an importance (GBDTs, variants, plug-ins alike)
        top = TrainedLearner.of(store, name).importance_top
        items = list(top.items())[:20]
        if not items:
            continue
        fig, ax = plt.subplots(figsize=(6, 0.25 * len(items) + 0.8))
        ax.barh([k for k, _ in items], [v for _, v in items], color="#55a868")
        ax.invert_yaxis()
        ax.set_title(f"{name}: gain importance (mean over folds)", fontsize=9)
        ax.tick_params(labelsize=7)
        importance_html.append(_png(fig))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(price, frame["stack"].to_numpy(), s=6, alpha=0.5)
    low, high = float(min(price.min(), frame["stack"].min())), float(max(price.max(), frame["stack"].max()))
    ax.plot([low, high], [low, high], color="grey", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("true price")
    ax.set_ylabel("stack out-of-fold price")
    scatter = _png(fig)

    best = html.escape(f"{record.best_meta} {record.best_params}")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>pricestack report</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}</style></head><body>
<h1>Stack report</h1>
<p>{record.train_rows} training rows, {record.test_rows} test rows; {record.trials} Optuna trials;
nested CV: {record.nested}. Final meta-learner: {best}.</p>
<h2>{name_of_metric} per base learner vs the stack (out of fold)</h2>{_table(scores)}{score_chart}
<h2>{name_of_metric} by true-price band</h2>{_table(band_table)}{band_chart}
<h2>Feature importance</h2>{''.join(importance_html) or '<p>no learner in this stack records importance</p>'}
<h2>Predicted vs true (stack, out of fold)</h2>{scatter}
</body></html>"""
    atomic_write(out, lambda tmp: tmp.write_text(page))
    return out
