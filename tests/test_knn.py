"""kNN features: leak-freedom (out of fold, duplicates, self) and faiss vs brute force on real rows."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from features.knn import knn_features, search


def _real_vectors(real_train: pl.DataFrame, n: int) -> np.ndarray:
    """Deterministic real-text vectors without a model: hashed character trigrams of real catalog texts."""
    from sklearn.feature_extraction.text import HashingVectorizer

    texts = real_train.head(n)["catalog_content"].to_list()
    matrix = HashingVectorizer(analyzer="char_wb", ngram_range=(3, 3), n_features=256).transform(texts)
    vectors = matrix.toarray().astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _setup(real_train: pl.DataFrame, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ids = real_train.head(n)["sample_id"].to_numpy()
    log_price = np.log1p(real_train.head(n)["price"].to_numpy())
    fold = np.arange(n) % 5
    fold[-20:] = -1  # the last 20 rows act as test rows
    return ids, _real_vectors(real_train, n), log_price, fold


def test_faiss_matches_brute_force(real_train: pl.DataFrame) -> None:
    _, vectors, _, _ = _setup(real_train, 300)
    sims, idx = search(vectors[:250], vectors[250:], 10)
    brute = vectors[250:] @ vectors[:250].T
    expected = np.sort(brute, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose(sims, expected, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(brute, idx, axis=1), sims, atol=1e-5)


def test_changing_fold_prices_never_changes_that_folds_features(real_train: pl.DataFrame) -> None:
    ids, vectors, log_price, fold = _setup(real_train)
    keys = [np.array([None] * len(ids), dtype=object)]
    base = knn_features(ids, vectors, log_price, fold, keys, [5, 20], "t")
    for k in range(5):
        changed = log_price.copy()
        changed[fold == k] = np.random.default_rng(k).uniform(0, 8, (fold == k).sum())
        again = knn_features(ids, vectors, changed, fold, keys, [5, 20], "t")
        for name, values in base.items():
            np.testing.assert_array_equal(again[name][fold == k], values[fold == k], err_msg=name)
        # ...while other folds do see the change (the test can fail).
        assert not np.allclose(again["t_k5_mean"][fold != k], base["t_k5_mean"][fold != k], equal_nan=True)


def test_exact_duplicates_never_hand_over_their_price(real_train: pl.DataFrame) -> None:
    ids, vectors, log_price, fold = _setup(real_train)
    # Row 7 (fold 2) gets an exact twin in fold 3 and row 12 (fold 2) a twin in the same fold; a test row too.
    twins = {7: 8, 12: 17, 190: 3}
    text_key = np.array([f"text-{i}" for i in range(len(ids))], dtype=object)
    for a, b in twins.items():
        vectors[b] = vectors[a]
        text_key[b] = text_key[a]
        log_price[b] = 9.99  # a price nothing else has
    out = knn_features(ids, vectors, log_price, fold, [text_key], [5], "t")
    for a in twins:
        assert out["t_nn1_logp"][a] != 9.99 and out["t_k5_max"][a] < 9.99
        assert out["t_nn1_sim"][a] < 0.9999
    # Without the duplicate key the twin would have been the nearest neighbour: the test can fail.
    leaky = knn_features(ids, vectors, log_price, fold, [np.array([None] * len(ids), dtype=object)], [5], "t")
    assert leaky["t_nn1_logp"][7] == 9.99
    # The test row averages its 5 per-fold searches; its twin (fold 3) is in 4 of the 5 bases.
    assert leaky["t_nn1_logp"][190] > out["t_nn1_logp"][190] + 4.0


def test_no_self_and_ties_broken_by_id(real_train: pl.DataFrame) -> None:
    ids = np.array([10, 3, 7, 5, 1], dtype=np.int64)
    vectors = np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (5, 1))  # all tied
    log_price = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    fold = np.array([0, 1, 1, 1, -1])
    keys = [np.array([None] * 5, dtype=object)]
    out = knn_features(ids, vectors, log_price, fold, keys, [2], "t")
    # Test row: the mean of its per-fold searches. Fold 0's base (fold 1: ids 3, 5, 7) gives id 3 (price 2.0),
    # fold 1's base (fold 0: id 10) gives price 1.0.
    assert out["t_nn1_logp"][4] == 1.5
    assert out["t_nn1_logp"][0] == 2.0  # fold 0 sees fold 1: ids 3, 5, 7 -> id 3
    assert out["t_nn1_logp"][1] == 1.0  # fold 1 sees only fold 0: id 10, never itself
    assert out["t_k2_count"][1] == 1


def test_an_unknown_knn_space_is_refused_and_an_imageless_catalog_skips_image_spaces() -> None:
    """Issue 26's soft failure: a space naming a table the config does not build (a typo, a model left out of
    text_embeddings.models) was dropped silently. Control: a catalog without images skips the image spaces."""
    from featurestore.config import load_config
    from featurestore.errors import ConfigError
    from pipeline.registry import builders_for

    default = [b.table for b in builders_for(load_config(None)) if b.table.startswith("knn__")]
    assert default == ["knn__text_minilm", "knn__text_mpnet", "knn__image_resnet", "knn__concat"]
    with pytest.raises(ConfigError, match="knn.spaces names 'text_emb__minlm'"):
        builders_for(load_config(None, {"knn.spaces": ["text_emb__minlm"]}))
    with pytest.raises(ConfigError, match="knn.spaces names 'text_emb__mpnet'"):
        builders_for(load_config(None, {"text_embeddings.models": ["minilm"]}))
    imageless = load_config(None, {"columns.image": ""})
    assert [b.table for b in builders_for(imageless) if b.table.startswith("knn__")] == [
        "knn__text_minilm", "knn__text_mpnet"]


def test_online_search_gives_each_folds_own_neighbours_whatever_the_batch(real_train: pl.DataFrame) -> None:
    """New rows' neighbours come from one exact similarity kernel over every training row, each fold's masked
    out in turn; they must be what a search of each fold's own faiss index gives (the first online version, kept
    here as reference), and a row's statistics must not depend on the rows sent with it (one row alone, the
    batch, the batch reversed). An approximate index (hnsw) searches each fold's own index."""
    import dataclasses

    from features.knn import _Online, _search_each, build_index, inner_products, neighbour_stats, online_stats
    from featurestore.folds import FoldMean, fold_plan

    ids, vectors, log_price, fold = _setup(real_train, 300)
    train = fold >= 0
    key = np.array([f"t{i % 97}" for i in range(len(ids))], dtype=object)  # duplicate groups of 3-4 rows
    queries, query_ids, query_keys = vectors[~train], ids[~train], [key[~train]]
    t_ids, t_vec, t_logp, t_fold, t_keys = ids[train], vectors[train], log_price[train], fold[train], [key[train]]
    ks, k = [5, 20], 20 + 16 + 4
    reference: dict[str, FoldMean] = {}
    for _, _, rows in fold_plan(t_fold):
        sims, idx = _search_each(build_index(t_vec[rows], "flat"), queries, k, 1)
        stats = neighbour_stats(sims, idx, t_ids[rows], t_logp[rows], [x[rows] for x in t_keys], query_ids,
                                query_keys, ks, "t")
        for name, values in stats.items():
            reference.setdefault(name, FoldMean(len(query_ids))).add(values)
    folds = [(f, None, rows) for f, _, rows in fold_plan(t_fold)]
    state = _Online(t_ids, t_logp, t_keys, t_fold, t_vec, folds, k, ks, 1)
    got = online_stats(state, queries, query_ids, query_keys, "t")
    assert got.keys() == reference.keys()
    for name, mean in reference.items():
        # faiss and the kernel round a sum differently (~1e-8): the same neighbours, similarities to 1e-6.
        np.testing.assert_allclose(got[name], mean.mean(), rtol=1e-6, atol=1e-7, err_msg=name)
    two_threads = online_stats(dataclasses.replace(state, threads=2), queries, query_ids, query_keys, "t")
    order = np.arange(len(queries))[::-1]
    backwards = online_stats(state, queries[order], query_ids[order], [query_keys[0][order]], "t")
    for row in [0, 7, len(queries) - 1]:
        alone = online_stats(state, queries[row:row + 1], query_ids[row:row + 1], [query_keys[0][row:row + 1]],
                             "t")
        for name in got:
            assert alone[name][0] == got[name][row] == backwards[name][len(queries) - 1 - row], (name, row)
    for name in got:
        np.testing.assert_array_equal(two_threads[name], got[name], err_msg=name)
    # The kernel itself: one query's products are the same bits alone, in a batch of 3 and in the whole batch.
    whole = inner_products(t_vec, queries, 2)
    assert np.array_equal(inner_products(t_vec, queries[5:6], 1)[0], whole[5])
    assert np.array_equal(inner_products(t_vec, queries[4:7], 2)[1], whole[5])
    np.testing.assert_allclose(whole, queries @ t_vec.T, rtol=1e-5, atol=1e-6)

    hnsw = [(f, build_index(t_vec[rows], "hnsw"), rows) for f, _, rows in fold_plan(t_fold)]
    approximate = online_stats(dataclasses.replace(state, folds=hnsw), queries, query_ids, query_keys, "t")
    close = np.isclose(approximate["t_k5_mean"], got["t_k5_mean"], rtol=1e-6, equal_nan=True)
    assert close.mean() > 0.9, "the hnsw path should find (nearly) the exact neighbours on 300 rows"
