"""The Ray engine (issue 24): one code path, two engines, the same bits.

One Ray for the whole module: a two-node `ray.cluster_utils.Cluster` (1 CPU each) standing in for a cluster, so
every test here also runs its units across two nodes. CLI subprocesses join it by address."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from featurestore.builders import BuildContext, run_builders
from featurestore.config import edited, load_config
from featurestore.engine import LocalEngine, engine_for
from featurestore.errors import EngineError, InputError
from featurestore.store import FeatureStore
from pipeline.registry import builders_for
from pipeline.run import train_and_stack
from tests.conftest import ROOT, SAMPLE
from tests.engine_units import open_store, raise_input_error
from tests.test_errors import CONFIG

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    two_nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                               "object_store_memory": 150 * 1024 * 1024})
    two_nodes.add_node(num_cpus=1, object_store_memory=150 * 1024 * 1024)
    ray.init(address=two_nodes.address, logging_level="ERROR", log_to_driver=False)
    two_nodes.wait_for_nodes()
    yield two_nodes
    ray.shutdown()
    two_nodes.shutdown()


# The Amazon sample, every builder the default config runs (MiniLM for text, spaCy, the real image backbone),
# three learners, a short study; one thread per unit under both engines.
SETTINGS = {
    "text_embeddings.models": ["minilm"], "knn.spaces": ["text_emb__minilm", "image_emb__resnet", "concat"],
    "models.learners": ["lgbm", "ridge", "mlp_sparse"], "models.threads": 1, "stacking.trials": 8,
    "models.lgbm": {"rounds": 80}, "models.mlp_sparse": {"epochs": 3, "members": 1},
    "engine.embed": {"num_cpus": 1}, "engine.knn": {"num_cpus": 1}, "engine.train": {"num_cpus": 1},
}


def _settings() -> dict[str, object]:
    """SETTINGS, each learner reading its default tables less MPNet's (not built here)."""
    from models.registry import learner_settings

    config = load_config(ROOT / "configs" / "default.toml")
    out = dict(SETTINGS)
    for name in SETTINGS["models.learners"]:  # type: ignore[union-attr]
        tables = [t for t in learner_settings(config, name).tables if "mpnet" not in t]
        out[f"models.{name}"] = {**out.get(f"models.{name}", {}), "tables": tables}  # type: ignore[dict-item]
    return out


def _build(store_dir: Path, kind: str) -> tuple[FeatureStore, object]:
    config = load_config(ROOT / "configs" / "default.toml", {**_settings(), "store.dir": str(store_dir),
                                                              "engine.kind": kind})
    store = FeatureStore(config.store.dir)
    engine = engine_for(config)
    run_builders(BuildContext(store, config, progress=False, engine=engine), builders_for(config))
    train_and_stack(config, store, config.stacking.trials, progress=False, engine=engine)
    return store, engine


def _digests(store: FeatureStore) -> dict[str, str]:
    files = sorted(store.tables_dir.glob("*.parquet")) + [store.root / "submission.csv"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_local_and_ray_build_the_same_tables_bit_for_bit_on_two_nodes(cluster, tmp_path: Path) -> None:
    local, _ = _build(tmp_path / "local", "local")
    on_ray, engine = _build(tmp_path / "ray", "ray")
    assert _digests(on_ray) == _digests(local)
    assert len(_digests(local)) >= 15
    # Units ran on both nodes (the fold fits and the kNN folds are spread over the two 1-CPU nodes).
    assert len(engine.nodes["train"]) == 2 and len(engine.nodes["knn"]) == 2, engine.nodes
    # What ran each table is recorded beside it, never in its fingerprint.
    info = on_ray.info("oof__lgbm")
    assert info.extra["engine"]["kind"] == "ray" and info.extra["engine"]["threads_per_unit"] == 1
    assert info.fingerprint == local.info("oof__lgbm").fingerprint


def test_a_units_error_arrives_as_itself_and_workers_never_open_the_store(cluster, tmp_path: Path) -> None:
    config = edited(load_config(None, {"store.dir": str(tmp_path)}), {"engine.kind": "ray"})
    engines = [LocalEngine(1), engine_for(config)]
    for engine in engines:
        with pytest.raises(InputError) as raised:
            list(engine.map("train", raise_input_error, [0, 1, 2, 3]))
        assert str(raised.value) == "unit 2: a message written for the user"  # not wrapped, not reworded
        assert list(engine.map("train", raise_input_error, [0, 1])) == [0, 10]
    FeatureStore(tmp_path)  # the store exists; the main process may open it (the control)
    assert list(engines[0].map("knn", open_store, [0], str(tmp_path))) == [1]
    with pytest.raises(EngineError, match="an engine worker tried to open the DuckDB file of the store"):
        list(engines[1].map("knn", open_store, [0], str(tmp_path)))


# tests/test_errors.py's config, with the learner that kills its worker and a retry count.
CLI_CONFIG = (CONFIG.replace('learners = ["broken", "refusing"]', 'learners = ["killing"]')
              + '[models.killing]\nkill_marker = "{marker}"\n[stacking]\nraw_features = []\n'
              + '[engine]\nretries = {retries}\n')


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def _store_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "lock" not in p.name and p.suffix not in (".wal",)}


def test_the_cli_on_ray_says_the_same_line_and_a_killed_worker_is_retried_or_reported(cluster, tmp_path: Path
                                                                                       ) -> None:
    pl.read_parquet(SAMPLE / "train.parquet").head(30).write_parquet(tmp_path / "train.parquet")
    marker = tmp_path / "kills"
    config = tmp_path / "c.toml"
    config.write_text(CLI_CONFIG.format(marker=marker, retries=0))
    common = ["--config", str(config), "--store", str(tmp_path / "s"), "--engine", "ray", "--address",
              cluster.address, "-q"]
    built = _cli("build-features", "--train", str(tmp_path / "train.parquet"), "--test", "", *common)
    assert built.returncode == 0, built.stderr[-2000:]
    # A known error raised inside a task: the same one line as under the local engine (tests/test_errors.py).
    errors = tmp_path / "errors.toml"
    errors.write_text(config.read_text().replace('learners = ["killing"]', 'learners = ["refusing", "broken"]'))
    refused = _cli("train", "--learner", "refusing", *[a if a != str(config) else str(errors) for a in common])
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "error: refusing: these rows cannot be used (a message written for the user)  (--debug shows the traceback)"]
    bug = _cli("train", "--learner", "broken", *[a if a != str(config) else str(errors) for a in common])
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "IndexError" in bug.stderr
    # A worker killed mid-fit with no retries left: one line; every file of the store is as it was (tables,
    # manifest, views). New files may only be fold models of the unfinished build, kept for a resume.
    before = _store_bytes(tmp_path / "s")
    marker.write_text("1")
    killed = _cli("train", *common)
    assert killed.returncode == 1 and "Traceback" not in killed.stderr, killed.stderr[-2000:]
    assert "a Ray worker died in the train stage" in killed.stderr and "rerun the command" in killed.stderr
    after = _store_bytes(tmp_path / "s")
    assert {name: after.get(name) for name in before} == before
    assert all(name.startswith("models/killing/") for name in set(after) - set(before)), sorted(after)
    # With a retry, the same kill is absorbed and the learner trains.
    config.write_text(CLI_CONFIG.format(marker=marker, retries=1))
    marker.write_text("1")
    retried = _cli("train", *common)
    assert retried.returncode == 0, retried.stderr[-2000:]
    assert marker.read_text() == "0"  # the kill happened, and the retry trained the fold
    oof = pl.read_parquet(tmp_path / "s" / "tables" / "oof__killing.parquet")
    assert oof.height == 30 and np.isfinite(oof["pred"].to_numpy()).all()


def test_the_local_engine_never_imports_ray() -> None:
    """`kind = "local"` (the default) keeps today's loops and speed: building and training never import Ray."""
    code = ("import sys; from featurestore.config import load_config; from featurestore.engine import engine_for; "
            "import pipeline.run, features.knn, embeddings.text, embeddings.images; "
            "engine_for(load_config(None)); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
