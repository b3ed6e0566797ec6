"""`train` and `stack` as the CLI runs them: check the feature tables are current, train the stale learners,
then stack them; under `--time-limit`, a schedule decides which learners train (pipeline.run.train_within)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from featurestore.budget import Budget, OverBudget
from featurestore.builders import BuildContext, BuildResult, run_builders, up_to_date
from featurestore.config import Config, edited
from featurestore.engine import Engine, engine_for
from featurestore.errors import UserError
from featurestore.store import FeatureStore, Timer
from models.train import LearnerBuilder, learner_builders
from pipeline.registry import require_fresh
from pipeline.stack import check_stack_settings, run_stack
from stacking.record import StackRecord

log = logging.getLogger(__name__)

# Of a time limit, the share the learners leave for the stack's candidates and tail (seconds, fraction of the
# limit: the larger is kept). On Mercari 30 candidates over 4 learners took ~10 s on 2 cores.
STACK_SHARE = (10.0, 0.04)


def train_learners(config: Config, store: FeatureStore, names: list[str] | None = None, force: bool = False,
                   progress: bool = True, engine: Engine | None = None) -> list[BuildResult]:
    """Cross-fit the learners whose `oof__` table is stale, after checking that the feature tables they read
    still match their inputs (a re-ingested train file must not meet the old folds and encodings)."""
    builders = learner_builders(config, names)
    require_fresh(config, store, {table for b in builders for table in b.inputs})
    return run_builders(BuildContext(store, config, progress=progress, engine=engine or engine_for(config)), builders,
                        force=force)


@dataclass
class Decision:
    """What a time limit did with one learner, for the run record."""

    learner: str
    action: str  # reused (up to date) | trained | skipped (not started) | stopped (between folds)
    reason: str
    seconds: float = 0.0


def expected_seconds(store: FeatureStore, builder: LearnerBuilder) -> float | None:
    """The learner's cost as last measured in this store: the sum of its recorded fold times (None: never
    trained here). Its settings may have changed since; the fold-by-fold projection is the safety net."""
    info = store.info(builder.table)
    seconds = info.extra.get("fold_seconds") if info is not None else None
    return float(sum(seconds.values())) if isinstance(seconds, dict) and seconds else None


def train_within(config: Config, store: FeatureStore, budget: Budget, progress: bool = True,
                 engine: Engine | None = None) -> tuple[list[BuildResult], list[Decision]]:
    """Train what fits in `budget`, cheapest first. Up-to-date learners are reused (free). The others go in
    order of their last measured cost in this store (never measured: after those, in config order; a variant of a
    learner this run already trained or stopped is expected to cost what that one did): training
    the cheap ones first gives the stack the most learners per second, and a learner's gain to the stack is not
    known before it has trained. A learner whose last measured cost exceeds the time left is skipped; one that
    trains is checked after each fold and stopped when the other folds, at its pace so far, would end past the
    deadline (its folds so far are not used; a learner that resumes folds, finetune, picks them up on a later run).
    Until one learner has finished, none is skipped on its recorded cost, so the stack has something to combine;
    when none finishes, a UserError says so."""
    builders = learner_builders(config)
    require_fresh(config, store, {table for b in builders for table in b.inputs})
    ctx = BuildContext(store, config, progress=progress, engine=engine or engine_for(config), budget=budget)
    fresh = {b.name for b in builders if up_to_date(store, b)}
    cost = {b.name: expected_seconds(store, b) for b in builders}
    order = sorted(builders, key=lambda b: (b.name not in fresh, cost[b.name] is None, cost[b.name] or 0.0))
    # What this run measured per learner class (a trained learner's time, a stopped one's projection): a variant
    # never trained here is expected to cost what its class just cost (mlp_sparse_emb what mlp_sparse took),
    # instead of spending a fold to find out.
    measured: dict[str, tuple[str, float]] = {}
    built: list[BuildResult] = []
    decisions: list[Decision] = []
    for builder in order:
        left = budget.left()
        expected, source = cost[builder.name], "its last training here took"
        if expected is None and builder.cls.name in measured:
            source, expected = measured[builder.cls.name]
        if builder.name not in fresh and built:
            if left <= 0:
                decisions.append(Decision(builder.name, "skipped", "no time left"))
                continue
            if expected is not None and expected > left:
                decisions.append(Decision(builder.name, "skipped", f"{source} {expected:.0f} s; "
                                                                   f"{left:.0f} s were left"))
                continue
        stop: OverBudget | None = None
        with Timer() as timer:
            try:
                result = run_builders(ctx, [builder])[0]
            except OverBudget as exc:
                stop = exc
        if stop is not None:
            decisions.append(Decision(builder.name, "stopped", stop.reason, round(timer.seconds, 1)))
            if stop.projected is not None:
                measured[builder.cls.name] = (f"{builder.name}, the same learner, was projected at", stop.projected)
            log.warning("time limit: %s", stop.reason)
            continue
        if builder.name not in fresh:
            measured[builder.cls.name] = (f"{builder.name}, the same learner, took", timer.seconds)
        action = "reused" if builder.name in fresh else "trained"
        why = ("up to date" if action == "reused" else
               f"{timer.seconds:.0f} s" + (f" (expected {expected:.0f} s)" if expected is not None else ""))
        decisions.append(Decision(builder.name, action, why, round(timer.seconds, 1)))
        built.append(result)
    if not built:
        why = "; ".join(d.reason for d in decisions)
        raise UserError(f"--time-limit {budget.seconds:.0f}: no learner finished in time ({why}); give more time or "
                        "a faster preset (--preset fast)")
    return built, decisions


def train_and_stack(config: Config, store: FeatureStore, trials: int, progress: bool = True,
                    engine: Engine | None = None, budget: Budget | None = None) -> StackRecord:
    """The settings are checked first: a bad meta-learner name must not wait for the learners to train. One
    engine ([engine]) runs the learners' folds and the stack's candidates. `budget`: train what fits (above),
    leave STACK_SHARE of it to the stack, stack the learners that finished, and record what was skipped."""
    check_stack_settings(config)
    engine = engine or engine_for(config)
    with Timer() as timer:
        if budget is None:
            built, schedule = train_learners(config, store, progress=progress, engine=engine), None
        else:
            share = max(STACK_SHARE[0], STACK_SHARE[1] * budget.seconds)
            built, decisions = train_within(config, store, budget.until(share), progress, engine)
            schedule = [asdict(d) for d in decisions]
            finished = [d.learner for d in decisions if d.action in ("trained", "reused")]
            config = edited(config, {"models.learners": [n for n in config.models.learners if n in finished]})
    return run_stack(store, config, trials, built, train_seconds=timer.seconds, engine=engine, budget=budget,
                     schedule=schedule)

