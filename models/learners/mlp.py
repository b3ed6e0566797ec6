"""Torch MLPs on dense features (embeddings, parsed catalog fields) plus the shared sparse text table
(`text_sparse`) fed straight into the first layer: an EmbeddingBag weighted by the TF-IDF values, so the sparse
matrix never becomes dense. Saved as a torch state_dict, loaded with weights_only.

`mlp_sparse` is the Mercari-winner shape: a wide first layer over the sparse text, small hidden layers, and
several members per fold (different seeds; odd members see binarised input) whose outputs are averaged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np
import scipy.sparse as sp
import torch
from numba import prange
from torch import nn

from featurestore.config import at_least, positive
from featurestore.store import atomic_write
from models.base import BaseLearner, Inputs, LearnerSettings, WithObjective, check_objective
from models.metrics import HUBER_DELTA
from models.registry import register


@dataclass
class MlpSettings(WithObjective):
    """`[models.mlp]` and `[models.mlp_sparse]`."""

    # Sparse tables (text_sparse) go straight into the first layer through an EmbeddingBag, never densified.
    tables: list[str] = field(default_factory=lambda: ["catalog", "text_emb__minilm", "text_emb__mpnet",
                                                       "image_emb__resnet", "text_sparse"])
    hidden: list[int] = field(default_factory=lambda: [256, 64])
    dropout: float = 0.1
    epochs: int = at_least(20, 1)
    batch_size: int = at_least(256, 1)
    learning_rate: float = positive(0.002)
    weight_decay: float = 1e-5
    early_stopping_epochs: int = at_least(4, 1)
    # Models averaged inside each fold (seeds seed, seed+1000, ...): Mercari's winners averaged several.
    members: int = at_least(1, 1)
    # Odd-numbered members see the sparse input binarised (value > 0 -> 1), a variant the winners mixed in.
    binary_variant: bool = False


class PriceNet(nn.Module):
    def __init__(self, n_dense: int, n_sparse: int, hidden: list[int], dropout: float) -> None:
        super().__init__()
        width = hidden[0]
        self.register_buffer("mean", torch.zeros(n_dense))
        self.register_buffer("scale", torch.ones(n_dense))
        self.register_buffer("y_mean", torch.zeros(()))
        self.register_buffer("y_scale", torch.ones(()))
        self.dense = nn.Linear(n_dense, width)
        # sparse=True: each step touches only the rows of the words in the batch, not all 50k x width weights.
        self.sparse = nn.EmbeddingBag(n_sparse, width, mode="sum", sparse=True) if n_sparse else None
        layers: list[nn.Module] = [nn.ReLU(), nn.Dropout(dropout)]
        for size in hidden[1:]:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.head = nn.Sequential(*layers)

    def forward(self, dense: torch.Tensor, bag: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
                ) -> torch.Tensor:
        sparse = None
        if self.sparse is not None and bag is not None:
            sparse = self.sparse(bag[0], bag[1], per_sample_weights=bag[2])
        return self.after_sparse(dense, sparse)

    def after_sparse(self, dense: torch.Tensor, sparse: torch.Tensor | None) -> torch.Tensor:
        """The net given the sparse first layer's output (None: no sparse input)."""
        # Standardised inputs; missing values sit at the mean (0) and extreme values are clipped.
        x = torch.nan_to_num((dense - self.mean) / self.scale, nan=0.0).clamp(-10, 10)
        h = self.dense(x)
        if sparse is not None:
            h = h + sparse
        return self.head(h).squeeze(-1)


def _bag(matrix: sp.csr_matrix | None, binary: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if matrix is None:
        return None
    values = np.ones_like(matrix.data, dtype=np.float32) if binary else matrix.data.astype(np.float32)
    return (torch.from_numpy(matrix.indices.astype(np.int64)), torch.from_numpy(matrix.indptr[:-1].astype(np.int64)),
            torch.from_numpy(values))


class _SparseLayerTrainer:
    """Trains the sparse first layer with lazy Adam (Adam on the rows a step touched, the others left as they are:
    what torch.optim.SparseAdam computes, with the same bias correction by step count), in three fused kernels
    over the weight in place: the bags' sums, the gradient scattered onto the touched rows, one Adam pass over
    them. Written with numba because the torch version (gather the touched rows, embedding_bag, index_select /
    index_copy of both moments, then index_add) passed over each touched row a dozen times: over half of a
    Mercari fit. Each parallel loop writes rows no other thread writes, and every sum runs in a fixed order:
    deterministic at any thread count."""

    def __init__(self, weight: torch.Tensor, lr: float, threads: int, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.weight = weight.detach().numpy()  # shares memory with the parameter: updates land in the net
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = np.zeros_like(self.weight)
        self.exp_avg_sq = np.zeros_like(self.weight)
        # The step's gradient, one row per touched row (slot), zeroed as Adam reads it: summed into a compact block
        # instead of the touched rows of a table-sized one, 30% less time in these kernels (fewer cache misses).
        self.grad = np.zeros((0, self.weight.shape[1]), dtype=np.float32)
        self.stamp = np.full(len(self.weight), -1, dtype=np.int64)
        self.slot = np.zeros(len(self.weight), dtype=np.int64)
        self.steps = 0
        self.threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))

    def forward(self, bag: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Each bag's weighted sum of its terms' rows: a leaf whose .grad `step` takes after backward."""
        numba.set_num_threads(self.threads)
        indices, offsets, values = (part.numpy() for part in bag)
        sums = np.empty((len(offsets), self.weight.shape[1]), dtype=np.float32)
        _bag_sums(self.weight, indices, offsets, values, sums)
        return torch.from_numpy(sums).requires_grad_(True)

    def step(self, bag: tuple[torch.Tensor, torch.Tensor, torch.Tensor], grad_sums: torch.Tensor) -> None:
        """One lazy Adam step on the rows `bag` touched, given the gradient of `forward(bag)`'s sums."""
        numba.set_num_threads(self.threads)
        indices, offsets, values = (part.numpy() for part in bag)
        if len(self.grad) < len(indices):
            self.grad = np.zeros((len(indices), self.weight.shape[1]), dtype=np.float32)
        local = np.empty(len(indices), dtype=np.int64)
        rows = _touched_rows(indices, self.stamp, self.slot, self.steps, local)
        _scatter_grad(np.ascontiguousarray(grad_sums.numpy()), local, offsets, values, self.grad)
        self.steps += 1
        beta1, beta2 = self.betas
        lr_t = self.lr * math.sqrt(1 - beta2 ** self.steps) / (1 - beta1 ** self.steps)
        _adam_rows(self.weight, self.exp_avg, self.exp_avg_sq, self.grad, rows, lr_t, beta1, beta2, self.eps)


@numba.njit(parallel=True, cache=True)
def _bag_sums(weight, indices, offsets, values, out):
    """out[b] = sum over bag b's terms (in order) of value * weight[term]."""
    n_bags = len(offsets)
    width = weight.shape[1]
    for b in prange(n_bags):
        start = offsets[b]
        stop = offsets[b + 1] if b + 1 < n_bags else len(indices)
        for j in range(width):
            out[b, j] = 0.0
        for t in range(start, stop):
            row = indices[t]
            v = values[t]
            for j in range(width):
                out[b, j] += v * weight[row, j]


@numba.njit(cache=True)
def _touched_rows(indices, stamp, slot, step, local):
    """The distinct rows in `indices` in order of first appearance, and each term's slot (its row's place in that
    list) into `local`. `stamp` marks the rows seen at `step`; `slot` is scratch."""
    out = np.empty(len(indices), dtype=np.int64)
    n = 0
    for t in range(len(indices)):
        row = indices[t]
        if stamp[row] != step:
            stamp[row] = step
            slot[row] = n
            out[n] = row
            n += 1
        local[t] = slot[row]
    return out[:n]


@numba.njit(cache=True)
def _scatter_grad(grad_out, local, offsets, values, acc):
    """acc[slot of term] += value * grad_out[bag] for every term of every bag, in term order. One thread: terms
    share rows, and split by columns over threads it ran 4x slower (the row's columns no longer vectorised)."""
    n_bags = len(offsets)
    width = acc.shape[1]
    for b in range(n_bags):
        start = offsets[b]
        stop = offsets[b + 1] if b + 1 < n_bags else len(local)
        for t in range(start, stop):
            s = local[t]
            v = values[t]
            for j in range(width):
                acc[s, j] += v * grad_out[b, j]


@numba.njit(parallel=True, cache=True)
def _adam_rows(weight, exp_avg, exp_avg_sq, acc, rows, lr_t, beta1, beta2, eps):
    """Lazy Adam on `rows`: row rows[i]'s gradient is acc[i], zeroed after use."""
    width = weight.shape[1]
    for i in prange(len(rows)):
        r = rows[i]
        for j in range(width):
            g = acc[i, j]
            m = beta1 * exp_avg[r, j] + (1.0 - beta1) * g
            v = beta2 * exp_avg_sq[r, j] + (1.0 - beta2) * g * g
            exp_avg[r, j] = m
            exp_avg_sq[r, j] = v
            weight[r, j] -= lr_t * m / (np.sqrt(v) + eps)
            acc[i, j] = 0.0


def _batches(x: Inputs, order: np.ndarray, size: int, binary: bool
             ) -> Iterator[tuple[np.ndarray, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]]:
    """One epoch's minibatches in `order`: (rows, dense tensor, sparse bag). The rows are put in epoch order once
    (one gather of the whole matrix), so each batch is a contiguous slice whose bag shares the epoch's buffers;
    gathering every batch's rows from the matrix apart cost more than the net's own step. The same batches, values
    and order as gathering each batch's rows."""
    dense = torch.from_numpy(np.ascontiguousarray(x.dense[order]))
    sparse = None if x.sparse is None else x.sparse[order]
    if sparse is not None:
        indices, _, values = _bag(sparse, binary)
        indptr = sparse.indptr.astype(np.int64)
    for start in range(0, len(order), size):
        stop = min(start + size, len(order))
        bag = None
        if sparse is not None:
            first, last = int(indptr[start]), int(indptr[stop])
            bag = (indices[first:last], torch.from_numpy(indptr[start:stop] - first), values[first:last])
        yield order[start:stop], dense[start:stop], bag


class Members(nn.Module):
    """The fold's members as one module, so one state_dict holds them all."""

    def __init__(self, nets: list[PriceNet]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)


@register
class MLPLearner(BaseLearner):
    name = "mlp"
    file_pattern = "fold{fold}.pt"
    reads_sparse = True
    supports_weights = True
    settings_type = MlpSettings

    def recorded_params(self) -> dict[str, Any]:
        cfg = self.settings
        return {"objective": cfg.objective, "hidden": cfg.hidden, "dropout": cfg.dropout, "epochs": cfg.epochs,
                "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "weight_decay": cfg.weight_decay,
                "members": cfg.members, "binary_variant": cfg.binary_variant}

    def _loss(self) -> nn.Module:
        objective = check_objective(self.name, self.settings.objective)
        # Per-row losses: rows are weighted (the metric's weights) before the mean.
        return {"huber": nn.HuberLoss(delta=HUBER_DELTA, reduction="none"), "l1": nn.L1Loss(reduction="none"),
                "l2": nn.MSELoss(reduction="none")}[objective]

    def _net(self, n_dense: int, n_sparse: int) -> PriceNet:
        cfg = self.settings
        return PriceNet(n_dense, n_sparse, cfg.hidden, cfg.dropout)

    def _binary(self, member: int) -> bool:
        return bool(self.settings.binary_variant and member % 2 == 1)

    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        assert watch is not None and y_watch is not None
        torch.set_num_threads(self.threads)
        nets = [self._fit_member(m, train, y, watch, y_watch) for m in range(max(1, self.settings.members))]
        self.members_ = Members([net for net, _ in nets])
        self.exact_: _ExactMembers | None = None
        self.best_iteration_ = int(np.mean([epochs for _, epochs in nets]))

    def _fit_member(self, member: int, train: Inputs, y: np.ndarray, watch: Inputs, y_watch: np.ndarray
                    ) -> tuple[PriceNet, int]:
        cfg = self.settings
        seed = self.seed + 1000 * member
        binary = self._binary(member)
        torch.manual_seed(seed)
        n_sparse = 0 if train.sparse is None else train.sparse.shape[1]
        net = self._net(train.dense.shape[1], n_sparse)
        with np.errstate(all="ignore"):
            mean = np.nan_to_num(np.nanmean(train.dense, axis=0))
            scale = np.nan_to_num(np.nanstd(train.dense, axis=0), nan=1.0)
        net.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        net.scale.copy_(torch.from_numpy(np.where(scale > 1e-6, scale, 1.0).astype(np.float32)))
        # The target's centre and scale under the row weights: a 0-weight row must not move them (unweighted, wild
        # 0-weight targets inflated the scale and the net fitted the rest badly; found by verify_learner).
        if train.weight is None:
            y_mean, y_std = float(y.mean()), float(y.std())
        else:
            y_mean = float(np.average(y, weights=train.weight))
            y_std = float(np.sqrt(np.average((y - y_mean) ** 2, weights=train.weight)))
        net.y_mean.fill_(y_mean)
        net.y_scale.fill_(y_std or 1.0)
        target = torch.from_numpy(((y - y_mean) / (y_std or 1.0)).astype(np.float32))
        dense_params = [p for name, p in net.named_parameters() if not name.startswith("sparse.")]
        optimisers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(dense_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)]
        sparse_trainer = None if net.sparse is None else _SparseLayerTrainer(net.sparse.weight, cfg.learning_rate,
                                                                             self.threads)
        loss_fn = self._loss()
        weight = torch.from_numpy((np.ones(len(train)) if train.weight is None else train.weight).astype(np.float32))
        watch_weight = np.ones(len(watch)) if watch.weight is None else watch.weight
        generator = torch.Generator().manual_seed(seed)
        best = (np.inf, copy.deepcopy(net.state_dict()), 0)
        for epoch in range(cfg.epochs):
            net.train()
            order = torch.randperm(len(train), generator=generator).numpy()
            for batch, dense, bag in _batches(train, order, cfg.batch_size, binary):
                for optimiser in optimisers:
                    optimiser.zero_grad()
                sparse = None
                if sparse_trainer is not None and bag is not None:
                    sparse = sparse_trainer.forward(bag)
                rows = loss_fn(net.after_sparse(dense, sparse), target[batch])
                loss = (rows * weight[batch]).mean()
                loss.backward()
                for optimiser in optimisers:
                    optimiser.step()
                if sparse_trainer is not None and sparse is not None:
                    sparse_trainer.step(bag, sparse.grad)
            watch_loss = float(np.average(np.abs(_watch_predict(net, watch, binary) - y_watch), weights=watch_weight))
            if watch_loss < best[0]:
                best = (watch_loss, copy.deepcopy(net.state_dict()), epoch + 1)
            elif epoch + 1 - best[2] >= cfg.early_stopping_epochs:
                break
        net.load_state_dict(best[1])
        return net, best[2]

    def _predict(self, x: Inputs) -> np.ndarray:
        # The float64 copies are made once per fitted or loaded model, not per call: a served model predicts a
        # few rows at a time, and copying a 100k-term first layer to float64 took longer than the prediction.
        if getattr(self, "exact_", None) is None:
            self.exact_ = _ExactMembers(self.members_.nets, [self._binary(m) for m in range(len(self.members_.nets))])
        return np.mean(self.exact_.predict(x, self.threads), axis=0)

    def _save(self, path: Path) -> None:
        atomic_write(path, lambda tmp: torch.save(self.members_.state_dict(), tmp))

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights only: never unpickle objects
        count = 1 + max(int(key.split(".")[1]) for key in state)
        nets = []
        for m in range(count):
            n_sparse = state[f"nets.{m}.sparse.weight"].shape[0] if f"nets.{m}.sparse.weight" in state else 0
            nets.append(self._net(state[f"nets.{m}.mean"].shape[0], n_sparse))
        self.members_ = Members(nets)
        self.members_.load_state_dict(state)
        self.exact_ = None


# Inference digits kept: float32 GEMM kernels round differently with the batch size (~1e-8), so a row priced in a
# batch of 5 came out unlike the same row in a batch of 20. Inference runs in float64, each row by the same loops
# whatever the batch (_members_forward), and is rounded here as well.
PREDICTION_DECIMALS = 9


class _ExactMembers:
    """A fold's members for inference: each net's dense layers stacked over members, and each member's sparse first
    layer as it is (a 100k+-row table copied to float64 took seconds per model and doubled a served MLP's memory);
    weights stay float32 and the kernel computes in float64, upcasting each weight as it reads it. One numba call
    prices every row with every member: a served row goes through up to 50 fold-member nets, and the torch path
    (an embedding bag and eight ops per net) spent most of its time dispatching ops on a few rows."""

    def __init__(self, nets: list[PriceNet], binary: list[bool]) -> None:
        def stacked(tensors: list[torch.Tensor], dtype: type = np.float64) -> np.ndarray:
            return np.ascontiguousarray(np.stack([t.detach().numpy().astype(dtype) for t in tensors]))

        # Per net, its linear layers in order: the dense first layer, then the head's.
        linears = [[net.dense, *(layer for layer in net.head if isinstance(layer, nn.Linear))] for net in nets]
        self.mean = stacked([net.mean for net in nets])
        self.scale = stacked([net.scale for net in nets])
        # Weights stay float32 (upcast exactly as they are read): half the bytes to stream for every row.
        self.layers = numba.typed.List([stacked([own[i].weight.T for own in linears], np.float32)
                                        for i in range(len(linears[0]))])
        self.biases = numba.typed.List([stacked([own[i].bias for own in linears]) for i in range(len(linears[0]))])
        self.sparse = numba.typed.List([net.sparse.weight.detach().numpy() if net.sparse is not None
                                        else np.zeros((0, net.dense.out_features), dtype=np.float32)
                                        for net in nets])
        self.binary = np.array(binary, dtype=np.bool_)
        self.y_mean = np.array([float(net.y_mean) for net in nets])
        self.y_scale = np.array([float(net.y_scale) for net in nets])

    def predict(self, x: Inputs, threads: int) -> np.ndarray:
        """(members, rows): each member's prediction in the target's space, rounded to PREDICTION_DECIMALS."""
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        # Each row's terms in column order (a sorted copy: the caller's matrix is shared by every fold's model).
        matrix = (sp.csr_matrix((len(x), 0), dtype=np.float32) if x.sparse is None
                  else sp.csr_matrix(x.sparse).sorted_indices())
        out = np.empty((len(self.mean), len(x)), dtype=np.float64)
        _members_forward(np.ascontiguousarray(x.dense, dtype=np.float32), matrix.indptr.astype(np.int64),
                         matrix.indices.astype(np.int64), matrix.data.astype(np.float32), self.mean, self.scale,
                         self.layers, self.biases, self.sparse, self.binary, out)
        return np.round(out * self.y_scale[:, None] + self.y_mean[:, None], PREDICTION_DECIMALS)


# Rows per task of the inference kernel: a block's hidden values (64 x 256 float64 = 128 KiB) stay in cache while
# a member's weights stream past once for the whole block.
_ROW_BLOCK = 64


@numba.njit(parallel=True, nogil=True, cache=True)
def _members_forward(dense, indptr, indices, values, mean, scale, layers, biases, sparse, binary, out):  # noqa: ANN001
    # One task per (member, block of rows), in parallel: standardise (missing at the mean, clipped to +-10), first
    # layer = bias + dense product + the row's sparse terms (the binary variant sees 1 for every present term), then
    # ReLU and the hidden layers, the last one linear. Weights are stored (member, in, out): each layer adds input
    # i's contribution to every output of every row of the block in turn (a loop over contiguous outputs that
    # vectorises as it is), so a member's weights are read once per block (they were read once per row: 8 rows
    # took 8 passes over ~2 MB per member), and every output is still summed over its inputs in one fixed order:
    # a row gets the same bits alone or in any batch (dropout is off in inference).
    members, n_dense = mean.shape
    rows = dense.shape[0]
    blocks = (rows + _ROW_BLOCK - 1) // _ROW_BLOCK
    for task in prange(members * blocks):
        m = task // blocks
        start = (task % blocks) * _ROW_BLOCK
        n = min(rows, start + _ROW_BLOCK) - start
        first = layers[0]
        h = np.empty((n, first.shape[2]))
        for r in range(n):
            h[r] = biases[0][m]
        for i in range(n_dense):
            for r in range(n):
                value = (np.float64(dense[start + r, i]) - mean[m, i]) / scale[m, i]
                if np.isnan(value):
                    value = 0.0
                value = min(10.0, max(-10.0, value))
                for o in range(first.shape[2]):
                    h[r, o] += value * np.float64(first[m, i, o])
        table = sparse[m]
        if table.shape[0]:
            for r in range(n):
                for at in range(indptr[start + r], indptr[start + r + 1]):
                    weight = 1.0 if binary[m] else np.float64(values[at])
                    column = indices[at]
                    for o in range(first.shape[2]):
                        h[r, o] += weight * np.float64(table[column, o])
        for layer in range(1, len(layers)):
            w = layers[layer]
            nxt = np.empty((n, w.shape[2]))
            for r in range(n):
                nxt[r] = biases[layer][m]
            for i in range(w.shape[1]):
                for r in range(n):
                    value = max(h[r, i], 0.0)
                    for o in range(w.shape[2]):
                        nxt[r, o] += value * np.float64(w[m, i, o])
            h = nxt
        for r in range(n):
            out[m, start + r] = h[r, 0]


@torch.no_grad()
def _watch_predict(net: PriceNet, x: Inputs, binary: bool) -> np.ndarray:
    """The watch rows' predictions for early stopping, in float32 on the training net: a float64 copy of the net
    (what `predict` uses, for batch-independent digits) took longer than the epoch itself with a wide first
    layer, and the stopping epoch needs no more than float32's digits."""
    net.eval()
    out = [net(dense, bag).numpy() for _, dense, bag in _batches(x, np.arange(len(x)), 4096, binary)]
    scaled = np.concatenate(out).astype(np.float64) if out else np.zeros(0, dtype=np.float64)
    return scaled * float(net.y_scale) + float(net.y_mean)


@register
class SparseMLPLearner(MLPLearner):
    """Its own `[models.mlp_sparse]` settings (wide sparse first layer, several members), stacked beside `mlp`."""

    name = "mlp_sparse"

    @classmethod
    def default_settings(cls) -> LearnerSettings:
        """Mercari-winner style: wide first layer over the sparse text, small dense tables, a few members."""
        return MlpSettings(tables=["catalog", "target_enc", "text_sparse"], hidden=[256, 64, 64], dropout=0.1,
                           epochs=12, batch_size=256, learning_rate=0.003, weight_decay=1e-5,
                           early_stopping_epochs=2, members=2, binary_variant=True)
