"""`knn__<space>`: statistics of the log-prices of each row's nearest training neighbours, out of fold.

Leak rules: a training row searches only the rows of the other folds (the shared `folds` table), so changing
the prices of fold k never changes fold k's features. Test rows search each fold's fitting rows in turn and get
the mean of those per-fold statistics, so they see (k-1)/k of the training rows like a training row does (the
same distribution as the out-of-fold features the learners were fitted on). Neighbours whose text
or image bytes equal the query's are skipped on both sides (duplicated products would hand over their own
price), and a row never sees itself (excluded by id). Ties in similarity are broken by neighbour id.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numba
import numpy as np
import polars as pl
from numba import prange

from featurestore.builders import BuildContext, Built, FeatureBuilder, OnlineRows, in_row_order
from featurestore.config import Config
from featurestore.engine import Engine, LocalEngine
from featurestore.errors import ConfigError, StaleTable
from featurestore.folds import FoldMean, fold_plan, items_with_folds
from featurestore.names import knn_space_name, knn_table
from featurestore.store import FeatureStore

TIE_MARGIN = 16  # extra neighbours fetched so ties at the k-th place can be broken by id


def short_name(space: str) -> str:
    return knn_space_name(space)


def make_index(dim: int, kind: str, n_train: int) -> faiss.Index:
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
    elif kind == "ivf":
        nlist = max(1, min(4096, int(np.sqrt(n_train))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.nprobe = max(1, nlist // 8)
    else:
        raise ConfigError(f"knn.index = {kind!r}; expected 'flat', 'hnsw' or 'ivf'")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and kind == "flat":
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def build_index(base: np.ndarray, kind: str) -> faiss.Index:
    index = make_index(base.shape[1], kind, len(base))
    if not index.is_trained:
        index.train(base)
    index.add(base)
    return index


def search(base: np.ndarray, queries: np.ndarray, k: int, kind: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    return build_index(base, kind).search(queries, min(k, len(base)))


def neighbour_stats(
    sims: np.ndarray, idx: np.ndarray, base_ids: np.ndarray, base_logp: np.ndarray, base_keys: list[np.ndarray],
    query_ids: np.ndarray, query_keys: list[np.ndarray], ks: list[int], prefix: str,
) -> dict[str, np.ndarray]:
    """Per query: drop invalid/self/duplicate neighbours, order by (-similarity, id), then statistics."""
    kept_logp, kept_sim = _kept(sims, idx, base_ids, base_logp, base_keys, query_ids, query_keys, max(ks))
    out: dict[str, np.ndarray] = {}
    out[f"{prefix}_nn1_logp"] = kept_logp[:, 0]
    out[f"{prefix}_nn1_sim"] = kept_sim[:, 0]
    with np.errstate(all="ignore"):
        for k in ks:
            lp, sm = kept_logp[:, :k], kept_sim[:, :k]
            weights = np.clip(np.nan_to_num(sm, nan=0.0), 0, None) + 1e-6
            weights = np.where(np.isnan(lp), 0.0, weights)
            out[f"{prefix}_k{k}_mean"] = np.nanmean(lp, axis=1)
            out[f"{prefix}_k{k}_median"] = np.nanmedian(lp, axis=1)
            out[f"{prefix}_k{k}_wmean"] = np.nansum(np.nan_to_num(lp) * weights, axis=1) / weights.sum(axis=1)
            out[f"{prefix}_k{k}_std"] = np.nanstd(lp, axis=1)
            out[f"{prefix}_k{k}_min"] = np.nanmin(lp, axis=1)
            out[f"{prefix}_k{k}_max"] = np.nanmax(lp, axis=1)
            out[f"{prefix}_k{k}_sim_mean"] = np.nanmean(sm, axis=1)
            out[f"{prefix}_k{k}_count"] = (~np.isnan(lp)).sum(axis=1).astype(np.int32)
    return out


def _kept(sims: np.ndarray, idx: np.ndarray, base_ids: np.ndarray, base_logp: np.ndarray,
          base_keys: list[np.ndarray], query_ids: np.ndarray, query_keys: list[np.ndarray], k_max: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Each query's first k_max neighbours (log price, similarity; NaN past the last) once invalid ones (-1),
    itself and rows sharing a key with it are dropped, ordered by (-similarity, id). All rows at once: one sort
    with the dropped ones keyed last (a loop over rows took ~30 us a row, most of a served batch's statistics)."""
    n = len(idx)
    candidate = np.where(idx >= 0, idx, 0)
    keep = (idx >= 0) & (base_ids[candidate] != query_ids[:, None])
    for base_key, query_key in zip(base_keys, query_keys, strict=True):
        present = np.array([key is not None for key in query_key], dtype=bool)
        keep &= ~(present[:, None] & (base_key[candidate] == query_key[:, None]))
    order = np.lexsort((base_ids[candidate], -sims, ~keep), axis=-1)[:, :k_max]
    kept = np.take_along_axis(keep, order, axis=1)
    chosen = np.take_along_axis(candidate, order, axis=1)
    kept_logp = np.full((n, k_max), np.nan)
    kept_sim = np.full((n, k_max), np.nan)
    kept_logp[:, :order.shape[1]] = np.where(kept, base_logp[chosen], np.nan)
    kept_sim[:, :order.shape[1]] = np.where(kept, np.take_along_axis(sims, order, axis=1).astype(np.float64), np.nan)
    return kept_logp, kept_sim


def _normalised(table: pl.DataFrame) -> np.ndarray:
    vectors = table["embedding"].to_numpy().astype(np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)


def _hash(values: list[str | None]) -> np.ndarray:
    return np.array([hashlib.sha1(v.encode()).hexdigest() if v else None for v in values], dtype=object)


def _largest_group(key: np.ndarray) -> int:
    return max(Counter(v for v in key if v is not None).values(), default=0)


@dataclass
class _Search:
    """What every fold's search reads (shipped to the engine once per table)."""

    ids: np.ndarray
    vectors: np.ndarray
    log_price: np.ndarray
    keys: list[np.ndarray]
    k: int  # neighbours fetched: max(ks) + margin
    ks: list[int]
    prefix: str
    index_kind: str


def _search_fold(s: _Search, unit: tuple[np.ndarray, np.ndarray], threads: int) -> dict[str, np.ndarray]:
    """One fold: its rows query the fold's fitting rows. The kNN stage's unit."""
    query_rows, base_rows = unit
    faiss.omp_set_num_threads(threads)
    queries = query_rows
    sims, idx = search(s.vectors[base_rows], s.vectors[queries], s.k, s.index_kind)
    return neighbour_stats(sims, idx, s.ids[base_rows], s.log_price[base_rows], [k[base_rows] for k in s.keys],
                           s.ids[queries], [k[queries] for k in s.keys], s.ks, s.prefix)


def knn_features(
    ids: np.ndarray, vectors: np.ndarray, log_price: np.ndarray, fold: np.ndarray, keys: list[np.ndarray],
    ks: list[int], prefix: str, index_kind: str = "flat", engine: Engine | None = None,
) -> dict[str, np.ndarray]:
    """Features for every row. fold = -1 marks test rows (unlabelled); train rows have fold >= 0. Training rows:
    one unit per fold on `engine` (default: here, every core), combined in fold order. Test rows: here, by the
    code that prices new rows (`online_stats`), so a stored test row's statistics are what `predict` and `serve`
    compute for the same row, bit for bit."""
    n = len(ids)
    engine = engine or LocalEngine(os.cpu_count() or 1)
    # Fetch enough extra neighbours that skipping every duplicate of a query still leaves max(ks) of them.
    margin = TIE_MARGIN + sum(_largest_group(k) for k in keys)
    columns: dict[str, np.ndarray] = {}
    # Each fold queries the other folds.
    plan = [(query_rows, base_rows) for _, query_rows, base_rows in fold_plan(fold) if len(base_rows)]
    shared = _Search(ids, vectors, log_price, keys, max(ks) + margin, ks, prefix, index_kind)
    for (query_rows, _), stats in zip(plan, engine.map("knn", _search_fold, plan, shared), strict=True):
        for name, values in stats.items():
            columns.setdefault(name, np.full(n, np.nan))[query_rows] = values
    # Every test row searches each fold's fitting rows and gets the mean over folds of what it finds.
    test_rows, train_rows = np.flatnonzero(fold < 0), np.flatnonzero(fold >= 0)
    if len(test_rows) and len(train_rows):
        state = online_search_state(ids[train_rows], vectors[train_rows], log_price[train_rows],
                                    [k[train_rows] for k in keys], fold[train_rows], ks, index_kind,
                                    os.cpu_count() or 1)
        stats = online_stats(state, vectors[test_rows], ids[test_rows], [k[test_rows] for k in keys], prefix)
        for name, values in stats.items():
            columns.setdefault(name, np.full(n, np.nan))[test_rows] = values
    return columns


def online_search_state(ids: np.ndarray, vectors: np.ndarray, log_price: np.ndarray, keys: list[np.ndarray],
                        fold: np.ndarray, ks: list[int], kind: str, threads: int) -> _Online:
    """What pricing rows outside the training set reads (training rows only, fold >= 0): their vectors, prices,
    folds and duplicate keys, each fold's fitting rows, and for an approximate index one index per fold."""
    faiss.omp_set_num_threads(threads)
    folds = [(f, None if kind == "flat" else build_index(vectors[base_rows], kind), base_rows)
             for f, _, base_rows in fold_plan(fold)]
    k = max(ks) + TIE_MARGIN + sum(_largest_group(key) for key in keys)
    return _Online(ids, log_price, keys, fold, np.ascontiguousarray(vectors, dtype=np.float32), folds, k, list(ks),
                   threads)


class KnnBuilder(FeatureBuilder):
    version = "2"
    extra_versions = ("faiss-cpu",)
    reads = ("knn", "columns.image")
    # Which kNN tables exist (spaces) is the registry's choice; this table's own space and source tables are in
    # its params. The image column matters only through the image_files input it adds.
    not_fingerprinted = ("knn.spaces", "knn.concat", "columns.image")

    def __init__(self, config: Config, space: str) -> None:
        super().__init__(config)
        self.space = space
        self.tables = list(config.knn.concat) if space == "concat" else [space]
        self.table = knn_table(space)
        extra = ("image_files",) if config.columns.image and config.knn.exclude_duplicates else ()
        self.inputs = ("items", "folds", *self.tables, *extra)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "space": self.space, "tables": self.tables}

    def build(self, ctx: BuildContext) -> Built:
        frame = items_with_folds(ctx.store, ["sample_id", "text", "price"])
        parts = []
        for name in self.tables:
            table = ctx.store.read(name, columns=["sample_id", "embedding"]).sort("sample_id")
            if not table["sample_id"].equals(frame["sample_id"]):
                raise StaleTable(f"{name} does not cover the same rows as items; rebuild it")
            parts.append(_normalised(table))
        vectors = self._vectors(parts)
        keys = self._keys(frame, lambda: ctx.store.read("image_files", columns=["sample_id", "sha256"]))
        columns = knn_features(frame["sample_id"].to_numpy(), vectors, np.log1p(frame["price"].to_numpy()),
                               frame["fold"].to_numpy(), keys, self.config.knn.ks, short_name(self.space),
                               self.config.knn.index, ctx.engine)
        return Built(frame.select("sample_id").with_columns(**{k: pl.Series(v) for k, v in columns.items()}),
                     {"engine": ctx.engine.record("knn")})

    @staticmethod
    def _vectors(parts: list[np.ndarray]) -> np.ndarray:
        """The space's vectors: each table's normalised vectors side by side, scaled so their norm is 1."""
        return np.ascontiguousarray(np.hstack(parts) / np.sqrt(len(parts)), dtype=np.float32)

    def _keys(self, frame: pl.DataFrame, image_files: Callable[[], pl.DataFrame]) -> list[np.ndarray]:
        """Per row of `frame` (sample_id, text): the keys a neighbour must not share (text hash, image file hash),
        when knn.exclude_duplicates; `image_files` gives (sample_id, sha256)."""
        keys: list[np.ndarray] = []
        if self.config.knn.exclude_duplicates:
            keys.append(_hash(frame["text"].to_list()))
            if "image_files" in self.inputs:
                files = frame.select("sample_id").join(image_files(), on="sample_id", how="left",
                                                       maintain_order="left")
                keys.append(np.array(files["sha256"].to_list(), dtype=object))
        return keys

    supports_online = True

    def online_state(self, trained: FeatureStore, threads: int) -> _Online:
        """The training rows' vectors, prices, folds and duplicate keys, loaded once (a test row's neighbours are
        each fold's fitting rows', averaged over folds, as in `build`); for an approximate index, one index per
        fold over its fitting rows."""
        frame = items_with_folds(trained, ["sample_id", "text", "price"]).filter(pl.col("fold") >= 0)
        tables = []
        for name in self.tables:
            table = frame.select("sample_id").join(trained.read(name, columns=["sample_id", "embedding"]),
                                                   on="sample_id", how="left", maintain_order="left")
            if table["embedding"].null_count():
                raise StaleTable(f"{name} does not cover the training rows of items; rebuild it")
            tables.append(_normalised(table))
        vectors = self._vectors(tables)
        keys = self._keys(frame, lambda: trained.read("image_files", columns=["sample_id", "sha256"]))
        return online_search_state(frame["sample_id"].to_numpy(), vectors, np.log1p(frame["price"].to_numpy()), keys,
                                   frame["fold"].to_numpy(), list(self.config.knn.ks), self.config.knn.index,
                                   threads)

    def online(self, state: _Online, rows: OnlineRows) -> pl.DataFrame:
        items = rows.tables["items"]
        queries = self._vectors([_normalised(in_row_order(items, rows.tables[name].select("sample_id", "embedding")))
                                 for name in self.tables])
        keys = self._keys(items, lambda: rows.tables["image_files"].select("sample_id", "sha256"))
        means = online_stats(state, queries, items["sample_id"].to_numpy(), keys, short_name(self.space))
        return items.select("sample_id").with_columns(**{k: pl.Series(v) for k, v in means.items()})


def online_stats(state: _Online, queries: np.ndarray, ids: np.ndarray, keys: list[np.ndarray],
                 prefix: str) -> dict[str, np.ndarray]:
    """New rows' neighbour statistics: per fold, among that fold's fitting rows, then the mean over folds (as
    `knn_features` gives test rows). The folds' neighbour lists are stacked and their statistics computed in one
    call (row by row, so the same digits as one call per fold)."""
    n = len(ids)
    lists = [(sims, idx) for sims, idx in _fold_neighbours(state, queries) if sims.shape[1]]
    if not lists:
        return {}
    width = max(sims.shape[1] for sims, _ in lists)  # shorter lists (a small fold) padded with no neighbour
    stats = neighbour_stats(np.concatenate([_pad(sims, width, -np.inf) for sims, _ in lists]),
                            np.concatenate([_pad(idx, width, -1) for _, idx in lists]), state.ids, state.log_price,
                            state.keys, np.tile(ids, len(lists)), [np.tile(key, len(lists)) for key in keys],
                            state.ks, prefix)
    out = {}
    for name, values in stats.items():
        mean = FoldMean(n)
        for part in range(len(lists)):
            mean.add(values[part * n:(part + 1) * n])
        out[name] = mean.mean()
    return out


def _pad(values: np.ndarray, width: int, fill: float) -> np.ndarray:
    if values.shape[1] == width:
        return values
    return np.hstack([values, np.full((len(values), width - values.shape[1]), fill, dtype=values.dtype)])


def _fold_neighbours(state: _Online, queries: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fold (state.folds' order), each query's `state.k` most similar fitting rows of that fold (indexes into
    every training row) and their similarities, in no particular order (neighbour_stats orders them by
    similarity, then id). Exact: one similarity block over every training row per chunk of queries, then one
    scan of it that keeps each fold's best fitting rows."""
    needs = [min(state.k, len(base_rows)) for _, _, base_rows in state.folds]
    if any(index is not None for _, index, _ in state.folds):  # approximate indexes: each fold's own
        out = []
        for (_, index, base_rows), need in zip(state.folds, needs, strict=True):
            sims, local = _search_each(index, queries, need, state.threads)
            out.append((sims, np.where(local >= 0, base_rows[np.maximum(local, 0)], -1)))
        return out
    width = max(needs, default=0)
    sims = np.full((len(state.folds), len(queries), width), -np.inf, dtype=np.float32)
    idx = np.full((len(state.folds), len(queries), width), -1, dtype=np.int64)
    for start in range(0, len(queries), QUERY_CHUNK):
        block = inner_products(state.vectors, queries[start:start + QUERY_CHUNK], state.threads)
        _fold_top(block, state.position, np.array(needs, dtype=np.int64), sims[:, start:start + len(block)],
                  idx[:, start:start + len(block)])
    return [(sims[place, :, :need], idx[place, :, :need]) for place, need in enumerate(needs)]


@numba.njit(parallel=True, nogil=True, cache=True)
def _fold_top(block: np.ndarray, position: np.ndarray, needs: np.ndarray, sims: np.ndarray, idx: np.ndarray) -> None:
    """Per query (row of `block`) and fold place p, the needs[p] largest similarities among the rows not in p
    (position != p), by one scan with a bounded min-heap per fold; a tie at a heap's bottom keeps the earlier
    row. Each query's lists depend only on its own row of `block`: batch invariant."""
    folds = len(needs)
    for q in prange(block.shape[0]):
        floor = -np.inf  # the smallest heap root: most rows fall below it and are passed over in one comparison
        for j in range(block.shape[1]):
            value = block[q, j]
            if not value > floor:
                continue
            for p in range(folds):
                need = needs[p]
                if position[j] == p or need == 0 or not value > sims[p, q, 0]:
                    continue
                # Replace the heap's smallest (its root) and sift it down.
                at = 0
                while True:
                    child = 2 * at + 1
                    if child >= need:
                        break
                    if child + 1 < need and sims[p, q, child + 1] < sims[p, q, child]:
                        child += 1
                    if not sims[p, q, child] < value:
                        break
                    sims[p, q, at] = sims[p, q, child]
                    idx[p, q, at] = idx[p, q, child]
                    at = child
                sims[p, q, at] = value
                idx[p, q, at] = j
            floor = np.inf
            for p in range(folds):
                if needs[p] and sims[p, q, 0] < floor:
                    floor = sims[p, q, 0]


QUERY_CHUNK = 256  # queries per similarity block: 256 x 55k training rows is 56 MB of float32


def inner_products(base: np.ndarray, queries: np.ndarray, threads: int) -> np.ndarray:
    """(len(queries), len(base)) float32 inner products, each computed by the same code whatever the batch: the
    exact search that online kNN uses. faiss sums 20 or more queries as one BLAS product and fewer one query at a
    time (the base streamed once per query); this kernel streams the base once per batch, each base row against
    every query while it is in cache (8 queries: 4.7 ms vs faiss's 11.3 ms for 55k x 384, 2 threads)."""
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    out = np.empty((len(queries), len(base)), dtype=np.float32)
    _inner_products(np.ascontiguousarray(base, dtype=np.float32), np.ascontiguousarray(queries, dtype=np.float32),
                    out)
    return out


@numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)
def _inner_products(base: np.ndarray, queries: np.ndarray, out: np.ndarray) -> None:
    # One (query, base row) sum is the same vectorised loop over the dimension whatever the other rows: batch
    # invariant (tests/test_knn.py checks it). fastmath only lets that loop be vectorised.
    n, dim = base.shape
    for block in prange((n + 127) // 128):
        for j in range(block * 128, min(n, block * 128 + 128)):
            for q in range(queries.shape[0]):
                total = np.float32(0.0)
                for d in range(dim):
                    total += base[j, d] * queries[q, d]
                out[q, j] = total


@dataclass
class _Online:
    """What pricing new rows reads of the training rows (KnnBuilder.online_state)."""

    ids: np.ndarray
    log_price: np.ndarray
    keys: list[np.ndarray]
    fold: np.ndarray  # each training row's fold
    vectors: np.ndarray  # every training row's vector (row order of ids)
    folds: list[tuple[int, faiss.Index | None, np.ndarray]]  # per fold: its approximate index (None when exact),
    # and its fitting rows
    k: int
    ks: list[int]
    threads: int
    position: np.ndarray = field(init=False)  # each training row's place in `folds` (-1: in none)

    def __post_init__(self) -> None:
        self.position = np.full(len(self.fold), -1, dtype=np.int64)
        for place, (fold, _, _) in enumerate(self.folds):
            self.position[self.fold == fold] = place


_BLAS_THRESHOLD_LOCK = threading.Lock()


def _search_each(index: faiss.Index, queries: np.ndarray, k: int, threads: int) -> tuple[np.ndarray, np.ndarray]:
    """Every query searched the same way whatever the batch: faiss computes 20 or more queries as one BLAS
    product and fewer one by one, whose sums round differently, so a row's neighbours' similarities would move
    with the number of rows sent with it. The one-by-one kernel for all (parallel over queries)."""
    with _BLAS_THRESHOLD_LOCK:
        faiss.omp_set_num_threads(threads)
        saved = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 2**30
        try:
            return index.search(queries, k)
        finally:
            faiss.cvar.distance_compute_blas_threshold = saved
