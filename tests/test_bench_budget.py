"""bench_budget's verdict compares like with like: CV with CV, a held-out fold with this product's score on the
same fold; an AutoGluon run that reached no score is not a comparison (issue 25)."""

from __future__ import annotations

from benchmarks.bench_budget import comparison

OURS = {"cv_smape": 36.5, "fold_smape": {"0": 36.9, "1": 36.1}}


def test_holdout_is_compared_with_the_same_fold_and_cv_with_cv() -> None:
    held = comparison(OURS, {"holdout_fold": 1, "holdout_smape": 36.3, "cv_smape": None})
    assert held == {"rows": "fold 1", "ours": 36.1, "autogluon": 36.3}
    assert comparison(OURS, {"cv_smape": 38.7}) == {"rows": "all folds (CV)", "ours": 36.5, "autogluon": 38.7}


def test_a_run_without_a_score_is_no_comparison() -> None:
    assert comparison(OURS, {"stopped": "no result after 1.5 x its time_limit (900 s wall)"}) is None
