"""The learner speed-ups of issue 25 compute what they replace.

- The sparse MLP's first layer is trained by fused numba kernels (models/learners/mlp.py `_SparseLayerTrainer`):
  its bag sums must equal torch's EmbeddingBag and its steps torch.optim.SparseAdam's (lazy Adam), the reference
  it replaced; a control with the bias correction left out must not match.
- LightGBM's `sparse_max_bin` caps the bins of sparse columns only (the dense ones keep theirs).
- The MLP's inference kernel (`_ExactMembers`, issue 27's serving speed) computes each member's float64 torch
  forward, and a row gets the same bits alone as in a batch; a control that skips the binary variant must not
  match."""

from __future__ import annotations

import lightgbm as lgb
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from models.base import Inputs
from models.learners import mlp
from models.learners.gbdt import LightGBMSettings, LightGBMTextLearner


def _bags(rng: np.random.Generator, n_rows: int, bags: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sizes = rng.integers(1, 6, bags)
    indices = torch.from_numpy(rng.integers(0, n_rows, int(sizes.sum())).astype(np.int64))
    offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))
    values = torch.from_numpy(rng.random(int(sizes.sum())).astype(np.float32))
    return indices, offsets, values


def _train_both(threads: int, forget_steps: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Five steps of our trainer and of EmbeddingBag + SparseAdam from one start, on the same bags and gradients;
    each step's sums are compared. `forget_steps`: the control, whose bias correction restarts at every step."""
    rng = np.random.default_rng(0)
    n_rows, width, lr = 40, 6, 0.01
    start = torch.from_numpy(rng.standard_normal((n_rows, width)).astype(np.float32))
    reference = nn.EmbeddingBag(n_rows, width, mode="sum", sparse=True)
    reference.weight.data.copy_(start)
    optimiser = torch.optim.SparseAdam(reference.parameters(), lr=lr)
    ours = start.clone()
    trainer = mlp._SparseLayerTrainer(ours, lr, threads)
    for _ in range(5):  # rows touched in one step and not the next keep their moments (lazy), as SparseAdam does
        bag = _bags(rng, n_rows, 7)
        grad_out = torch.from_numpy(rng.standard_normal((7, width)).astype(np.float32))
        optimiser.zero_grad()
        expected = reference(bag[0], bag[1], per_sample_weights=bag[2])
        expected.backward(grad_out)
        optimiser.step()
        sums = trainer.forward(bag)
        if forget_steps:
            trainer.steps = 0
        else:  # (the control's weights, and so its sums, part from the reference after its second step)
            np.testing.assert_allclose(sums.detach().numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-6)
        trainer.step(bag, grad_out)
    return start.numpy(), ours.numpy(), reference.weight.detach().numpy()


@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_layer_trainer_is_lazy_adam(threads: int) -> None:
    start, ours, expected = _train_both(threads, forget_steps=False)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ours, start, atol=1e-3)  # it moved
    # The control: the same comparison catches a bias correction that forgets the step count.
    _, wrong, expected = _train_both(threads, forget_steps=True)
    assert not np.allclose(wrong, expected, rtol=1e-5, atol=1e-6)


def _thresholds(booster: lgb.Booster, feature: int) -> set[float]:
    frame = booster.trees_to_dataframe()
    return set(frame.loc[frame["split_feature"] == booster.feature_name()[feature], "threshold"].dropna())


def test_sparse_max_bin_caps_the_sparse_columns_bins_and_only_theirs() -> None:
    rng = np.random.default_rng(1)
    n = 3000
    dense = rng.random((n, 1)).astype(np.float32)
    term = rng.random(n).astype(np.float32) * (rng.random(n) < 0.6)  # a TF-IDF-like column: zero or a weight
    y = 3 * dense[:, 0] + 5 * term + rng.normal(0, 0.05, n)
    x = Inputs(dense, sp.csr_matrix(term[:, None]))
    watch = np.arange(2500, n)
    fit = np.arange(2500)

    def fitted(sparse_max_bin: int) -> lgb.Booster:
        settings = LightGBMSettings(tables=[], rounds=60, learning_rate=0.2, early_stopping_rounds=60, objective="l2",
                                sparse_max_bin=sparse_max_bin, params={"min_data_in_leaf": 5})
        learner = LightGBMTextLearner(settings, 0, 1, ["dense", "term"], [])
        learner.fit(x.rows(fit), y[fit], x.rows(watch), y[watch])
        return learner.model_

    capped, control = fitted(3), fitted(0)
    # 3 bins: zero and two above it, so at most two cut points on the term; the dense column keeps its 255 bins.
    assert len(_thresholds(capped, 1)) <= 2
    assert len(_thresholds(control, 1)) > 5  # the control: without the cap the term is cut at many points
    assert len(_thresholds(capped, 0)) > 5


def _members(rng: np.random.Generator, n_dense: int, vocab: int) -> list[mlp.PriceNet]:
    torch.manual_seed(0)
    nets = []
    for _ in range(4):
        net = mlp.PriceNet(n_dense, vocab, [16, 8, 4], 0.1)
        with torch.no_grad():
            net.sparse.weight.normal_(0, 0.3)
            net.mean.copy_(torch.from_numpy(rng.standard_normal(n_dense).astype(np.float32)))
            net.scale.uniform_(0.5, 2.0)
            net.y_mean.fill_(3.0)
            net.y_scale.fill_(0.7)
        nets.append(net.eval())
    return nets


def test_mlp_inference_kernel_is_the_float64_forward_and_batch_invariant() -> None:
    rng = np.random.default_rng(3)
    n, n_dense, vocab = 60, 7, 300
    dense = rng.standard_normal((n, n_dense)).astype(np.float32)
    dense[3, 2], dense[5, 1] = np.nan, np.inf  # missing sits at the mean; extremes are clipped
    sparse = sp.random(n, vocab, density=0.05, format="csr", dtype=np.float32, random_state=1)
    nets = _members(rng, n_dense, vocab)
    binary = [False, True, False, True]
    got = mlp._ExactMembers(nets, binary).predict(Inputs(dense, sparse), 2)
    skipped = mlp._ExactMembers(nets, [False] * 4).predict(Inputs(dense, sparse), 2)
    for m, net in enumerate(nets):
        exact = copy_double(net)
        bag = mlp._bag(sparse, binary[m])
        with torch.no_grad():
            out = exact(torch.from_numpy(dense.astype(np.float64)), (bag[0], bag[1], bag[2].double())).numpy()
        reference = out * float(net.y_scale) + float(net.y_mean)
        np.testing.assert_allclose(got[m], reference, rtol=0, atol=1e-9)
        if binary[m]:
            assert np.abs(skipped[m] - reference).max() > 1e-3, "the control (binary variant skipped) matched"
    one_by_one = np.concatenate([mlp._ExactMembers(nets, binary).predict(Inputs(dense[i:i + 1], sparse[i:i + 1]), 1)
                                 for i in range(n)], axis=1)
    assert np.array_equal(one_by_one, got)


def copy_double(net: mlp.PriceNet) -> mlp.PriceNet:
    import copy

    return copy.deepcopy(net).double()
