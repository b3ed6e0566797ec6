"""`train` and `stack` as the CLI runs them: check the feature tables are current, train the stale learners,
then stack them."""

from __future__ import annotations

from featurestore.builders import BuildContext, BuildResult, run_builders
from featurestore.config import Config
from featurestore.engine import Engine, engine_for
from featurestore.store import FeatureStore, Timer
from models.train import learner_builders
from pipeline.registry import require_fresh
from pipeline.stack import check_stack_settings, run_stack
from stacking.record import StackRecord


def train_learners(config: Config, store: FeatureStore, names: list[str] | None = None, force: bool = False,
                   progress: bool = True, engine: Engine | None = None) -> list[BuildResult]:
    """Cross-fit the learners whose `oof__` table is stale, after checking that the feature tables they read
    still match their inputs (a re-ingested train file must not meet the old folds and encodings)."""
    builders = learner_builders(config, names)
    require_fresh(config, store, {table for b in builders for table in b.inputs})
    return run_builders(BuildContext(store, config, progress=progress, engine=engine or engine_for(config)), builders,
                        force=force)


def train_and_stack(config: Config, store: FeatureStore, trials: int, progress: bool = True,
                    engine: Engine | None = None) -> StackRecord:
    """The settings are checked first: a bad meta-learner name must not wait for the learners to train. One
    engine ([engine]) runs the learners' folds and the stack's candidates."""
    check_stack_settings(config)
    engine = engine or engine_for(config)
    with Timer() as timer:
        built = train_learners(config, store, progress=progress, engine=engine)
    return run_stack(store, config, trials, built, train_seconds=timer.seconds, engine=engine)
