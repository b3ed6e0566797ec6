"""The candidate study of the stack: Optuna proposes meta-learner candidates (which meta, its hyper-parameters)
over the base learners' OOF predictions; a second level of cross-validation on the same folds scores them.

Honesty. Level 1: a row's OOF prediction comes from the fold model that never saw it. Level 2 (nested, the
default): the meta-learner that predicts outer fold k is *chosen* and fitted without fold k's rows, so the
reported stack SMAPE is measured on rows its tuning never saw (many trials over OOF predictions otherwise
overfit). The final meta-learner is chosen by CV on all training rows, refitted on them, and predicts the test rows.

Speed (issue 11: 2,371 s -> seconds). One candidate set serves every outer fold: candidates are drawn
independently of the data (Optuna's RandomSampler, reseeded per candidate index, so a resumed run proposes the same
ones), so no candidate carries information from the fold it is scored on. Each candidate is fitted 15 times for
5 folds: once without each fold {a} (the final CV, and the nested OOF predictions) and once without each pair
{a, b} (that one model is outer fold a's inner model for fold b and outer fold b's for fold a). Ridge is solved in
closed form; the LightGBM meta reads its round count off the held-out curves of those same fits. Candidates are
evaluated in parallel processes, one thread each. The mean of the base predictions and the best single learner are
always candidates, so the stack can fall back to them when a fitted meta overfits.

Studies live in `<store>/optuna.journal` (Optuna's journal file storage), named by a key of their inputs; each
candidate's scores are stored with its trial, so a rerun after a crash evaluates only the missing candidates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from multiprocessing import get_context
from typing import Any

import numpy as np
import optuna
from threadpoolctl import threadpool_limits

from featurestore.config import Config, import_plugins
from featurestore.engine import Engine
from featurestore.errors import ConfigError
from featurestore.folds import n_folds
from models.metrics import metric
from stacking.inputs import META_THREADS, StackInputs, make_meta
from stacking.meta import MetaLearner, baseline_metas, meta_class

log = logging.getLogger(__name__)


# -- evaluating one candidate -------------------------------------------------------------------------------
@dataclass
class Candidate:
    index: int
    meta: str
    params: dict[str, Any]


@dataclass
class Scores:
    inner: dict[int, float]  # outer fold k -> the task's metric on its inner CV (rows outside fold k)
    final: float  # the task's metric on the CV over all training rows
    at: dict[str, int | None]  # curve parameter (LightGBM rounds) per outer fold ("k") and for "final"
    # The same CVs fold by fold (what the selection rule reads for its standard errors): outer fold k -> inner
    # fold j -> score on fold j's rows; "final" -> fold a -> score on fold a's rows.
    folds: dict[str, dict[int, float]]


def fit_candidate(c: Candidate, inputs: StackInputs, rows: np.ndarray, seed: int,
                  valid: list[np.ndarray] | None, at: int | None = None) -> MetaLearner:
    params = dict(c.params)
    if at is not None and meta_class(c.meta).curve_param:
        params[meta_class(c.meta).curve_param] = at
    return make_meta(c.meta, params, inputs.n_base, seed, inputs.metric).fit_rows(inputs.x, inputs.y, rows, valid,
                                                                                  inputs.weight)


def _best_round(curves: list[np.ndarray], weights: list[int]) -> int:
    """Best round of the row-weighted mean curve over the rounds every fit reached (fits stop early)."""
    length = min(len(c) for c in curves)
    mean = sum(w * c[:length] for w, c in zip(weights, curves, strict=True)) / sum(weights)
    return int(np.argmin(mean)) + 1


def evaluate(c: Candidate, inputs: StackInputs, seed: int) -> Scores:
    """Fit without each fold and without each pair of folds; score every outer fold's inner CV and the final CV."""
    train = np.flatnonzero(inputs.fold >= 0)
    folds = sorted(set(inputs.fold[train].tolist()))
    rows_of = {k: train[inputs.fold[train] == k] for k in folds}
    curved = meta_class(c.meta).curve_param is not None
    score = metric(inputs.metric).score
    singles = {a: fit_candidate(c, inputs, train[inputs.fold[train] != a], seed, [rows_of[a]] if curved else None)
               for a in folds}
    pairs = {}
    for a, b in combinations(folds, 2):
        fit_rows = train[(inputs.fold[train] != a) & (inputs.fold[train] != b)]
        valid = [rows_of[a], rows_of[b]] if curved else None
        pairs[(a, b)] = pairs[(b, a)] = fit_candidate(c, inputs, fit_rows, seed, valid)
    at: dict[str, int | None] = {}
    inner: dict[int, float] = {}
    per_fold: dict[str, dict[int, float]] = {}
    for k in folds:
        others = [j for j in folds if j != k]
        if curved:  # pair (k, j) recorded fold j's curve as valid set 0 or 1 depending on the order of (a, b)
            curves = [pairs[(k, j)].curves_[1 if k < j else 0] for j in others]
            at[str(k)] = _best_round(curves, [len(rows_of[j]) for j in others])
        preds = [pairs[(k, j)].predict(inputs.x[rows_of[j]], at.get(str(k))) for j in others]
        truth = [inputs.price[rows_of[j]] for j in others]
        inner[k] = score(np.concatenate(truth), np.expm1(np.concatenate(preds)))
        per_fold[str(k)] = {j: score(t, np.expm1(p)) for j, t, p in zip(others, truth, preds, strict=True)}
    if curved:
        at["final"] = _best_round([singles[a].curves_[0] for a in folds], [len(rows_of[a]) for a in folds])
    preds = [singles[a].predict(inputs.x[rows_of[a]], at.get("final")) for a in folds]
    truth = [inputs.price[rows_of[a]] for a in folds]
    per_fold["final"] = {a: score(t, np.expm1(p)) for a, t, p in zip(folds, truth, preds, strict=True)}
    return Scores(inner, score(np.concatenate(truth), np.expm1(np.concatenate(preds))), at, per_fold)


_WORKER: dict[str, Any] = {}


def _init_worker(inputs: StackInputs, seed: int, plugins: tuple[str, ...] = ()) -> None:
    # A spawned worker starts with a fresh registry: plug-in metas (models.plugins) must register here too.
    import_plugins(list(plugins), "models.plugins", "my_package.my_meta")
    # One thread per worker for the BLAS/OpenMP pools too (numpy's OpenBLAS starts one thread per core in each
    # spawned worker): with `workers` processes on as many cores, any more only thrash. Measured on Mercari,
    # 30 candidates: 2 workers took 33.4 s without this limit, as long as 1 worker (31.7 s).
    _WORKER.update(inputs=inputs, seed=seed, limits=threadpool_limits(limits=META_THREADS))


def _evaluate_in_worker(candidate: Candidate) -> Scores:
    return evaluate(candidate, _WORKER["inputs"], _WORKER["seed"])


def _evaluate_chunk(shared: tuple[StackInputs, int, tuple[str, ...]], chunk: list[Candidate], threads: int
                    ) -> list[Scores]:
    """The stack stage's unit on an engine: a chunk of candidates, one BLAS thread (as the process pool's)."""
    inputs, seed, plugins = shared
    import_plugins(list(plugins), "models.plugins", "my_package.my_meta")  # a fresh worker's registry, as above
    with threadpool_limits(limits=META_THREADS):
        return [evaluate(c, inputs, seed) for c in chunk]


# -- the study ------------------------------------------------------------------------------------------------
def _propose(study: optuna.Study, index: int, metas: list[str], seed: int) -> tuple[optuna.Trial, Candidate]:
    """Candidate `index`: the baselines first, then random draws seeded by (seed, index): the same candidates
    whatever the run's history, so an interrupted run resumes to identical results."""
    study.sampler = optuna.samplers.RandomSampler(seed=seed * 1_000_003 + index)
    trial = study.ask()
    trial.set_user_attr("candidate", index)
    baselines = baseline_metas()
    if index < len(baselines):
        meta = baselines[index]
        trial.set_user_attr("meta", meta)
        return trial, Candidate(index, meta, {})
    meta = _meta_for(index - len(baselines), metas)
    trial.set_user_attr("meta", meta)
    return trial, Candidate(index, meta, meta_class(meta).suggest(trial))


def _meta_for(draw: int, metas: list[str]) -> str:
    """Which meta the draw-th random candidate is: a fixed cycle weighted by each meta's `candidate_weight`, so the
    mix does not depend on the data and a resumed run assigns the same metas."""
    weights = {m: meta_class(m).candidate_weight for m in metas}
    # Interleaved (blend, ridge, lgbm, blend, ridge, ...): a short study still sees every meta.
    cycle = [m for r in range(max(weights.values())) for m in metas if weights[m] > r]
    return cycle[draw % len(cycle)]


def _params_of(trial: optuna.trial.FrozenTrial) -> Candidate:
    meta = trial.user_attrs["meta"]
    prefix = f"{meta}_"
    params = {k[len(prefix):]: v for k, v in trial.params.items() if k.startswith(prefix)}
    return Candidate(int(trial.user_attrs["candidate"]), meta, params)


def run_study(study_name: str, inputs: StackInputs, config: Config, trials: int,
              storage: optuna.storages.BaseStorage | None, workers: int = 1, engine: Engine | None = None,
              deadline: float | None = None) -> dict[int, tuple[Candidate, Scores]]:
    """Evaluate `trials` candidates (the baselines included); resume the ones a previous run finished. On a
    distributed engine, chunks of `engine.candidates_per_task` candidates are its units; locally, `workers`
    spawned processes. `deadline` (time.monotonic): no candidate is taken in after it, the baselines excepted
    (candidates in flight finish; those not started are cancelled), so a time-limited stack ends with what it
    scored."""
    baselines = baseline_metas()
    metas = [m for m in config.stacking.metas if m not in baselines]
    for name in config.stacking.metas:
        meta_class(name)
    if n_folds(inputs.fold) < 3:
        raise ConfigError(f"stacking needs at least 3 folds for its nested CV; folds.k gives {n_folds(inputs.fold)}")
    seed = config.stacking.seed
    study = optuna.create_study(study_name=study_name, storage=storage, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(seed=seed), load_if_exists=True)
    done: dict[int, tuple[Candidate, Scores]] = {}
    for trial in study.get_trials(deepcopy=False):
        if trial.state == optuna.trial.TrialState.COMPLETE and "scores" in trial.user_attrs:
            if trial.user_attrs.get("checksum") != _checksum(trial.user_attrs, trial.params):
                # A damaged record (a flipped digit in a score would pick another meta-learner): evaluate the
                # candidate again instead of trusting it.
                log.warning("optuna journal: candidate %s's record fails its checksum; evaluating it again",
                            trial.user_attrs.get("candidate"))
                continue
            raw = trial.user_attrs["scores"]
            if "folds" not in raw:  # recorded before fold-by-fold scores were kept: evaluated again
                continue
            scores = Scores({int(k): v for k, v in raw["inner"].items()}, raw["final"], raw["at"],
                            {key: {int(j): v for j, v in by_fold.items()} for key, by_fold in raw["folds"].items()})
            done[int(trial.user_attrs["candidate"])] = (_params_of(trial), scores)
        elif trial.state == optuna.trial.TrialState.RUNNING:  # left by a crashed run: its candidate is redone
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    todo = [i for i in range(max(trials, len(baselines))) if i not in done]
    if not metas:
        todo = [i for i in todo if i < len(baselines)]
    proposed = [_propose(study, i, metas, seed) for i in todo]
    candidates = [c for _, c in proposed]
    # Scores are told as they arrive (in candidate order), so a crash keeps every candidate finished before it.
    if engine is not None and engine.kind != "local":
        size = config.engine.candidates_per_task
        chunks = [candidates[i : i + size] for i in range(0, len(candidates), size)]
        shared = (inputs, seed, tuple(config.models.plugins))
        scores = (s for chunk in engine.map("stack", _evaluate_chunk, chunks, shared) for s in chunk)
        _tell_all(study, proposed, scores, done, deadline)
    elif workers > 1 and len(candidates) > 1:
        # Spawned, not forked: `stack` has just trained the learners in this process, and OpenMP (LightGBM,
        # torch) deadlocks in a child forked from a parent whose thread pool is running.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                 initargs=(inputs, seed, tuple(config.models.plugins))) as pool:
            _tell_all(study, proposed, pool.map(_evaluate_in_worker, candidates, chunksize=2), done, deadline)
            pool.shutdown(cancel_futures=True)  # after a deadline: the candidates not started are dropped
    else:
        _tell_all(study, proposed, (evaluate(c, inputs, seed) for c in candidates), done, deadline)
    for trial, candidate in proposed:  # left untold by a deadline: failed, so a later run proposes them again
        if candidate.index not in done:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return done


def _tell_all(study: optuna.Study, proposed: list[tuple[optuna.Trial, Candidate]], results: Iterator[Scores],
              done: dict[int, tuple[Candidate, Scores]], deadline: float | None = None) -> None:
    keep = len(baseline_metas())  # the fallbacks (mean, single, constant) are always scored
    for (trial, candidate), scores in zip(proposed, results, strict=True):
        record = {"inner": {str(k): v for k, v in scores.inner.items()}, "final": scores.final, "at": scores.at,
                  "folds": {key: {str(j): v for j, v in by_fold.items()} for key, by_fold in scores.folds.items()}}
        trial.set_user_attr("scores", record)
        trial.set_user_attr("checksum", _checksum({"scores": record, "candidate": candidate.index,
                                                   "meta": candidate.meta}, trial.params))
        study.tell(trial, scores.final)
        done[candidate.index] = (candidate, scores)
        if deadline is not None and candidate.index >= keep - 1 and time.monotonic() > deadline:
            log.info("stack: time is up after %d candidates", len(done))
            break


def _checksum(attrs: dict[str, Any], params: dict[str, Any]) -> str:
    """sha256 over what a finished candidate's record is trusted for: its scores, index, meta and parameters."""
    payload = {"scores": attrs.get("scores"), "candidate": attrs.get("candidate"), "meta": attrs.get("meta"),
               "params": params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
