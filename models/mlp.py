"""A small torch MLP on dense features (embeddings, parsed catalog fields) plus, optionally, the sparse TF-IDF of
the item text fed straight into the first layer (an EmbeddingBag weighted by the TF-IDF values: the sparse
matrix never becomes dense). Saved as a torch state_dict; the TF-IDF vocabulary and idf weights as JSON.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.feature_extraction.text import TfidfVectorizer
from torch import nn

from models.base import BaseLearner, Inputs, check_objective, save_atomic, threads


class TfidfText:
    """Word uni+bi-gram TF-IDF fitted on the training texts (no target involved), saved as JSON, not pickle."""

    def __init__(self, max_features: int) -> None:
        self.vectorizer = TfidfVectorizer(max_features=max_features, ngram_range=(1, 2), min_df=2,
                                          sublinear_tf=True, dtype=np.float32)

    def fit(self, texts: list[str]) -> None:
        try:
            self.vectorizer.fit(texts)
        except ValueError:  # fewer than two rows share any word (tiny data): keep every word seen once
            self.vectorizer.set_params(min_df=1)
            self.vectorizer.fit(texts)

    def transform(self, texts: list[str]) -> sp.csr_matrix:
        return self.vectorizer.transform(texts).tocsr()

    def save(self, path: Path) -> None:
        payload = {"params": {k: v for k, v in self.vectorizer.get_params().items() if k in ("ngram_range", "min_df",
                                                                                                "sublinear_tf")},
                   "vocabulary": {k: int(v) for k, v in self.vectorizer.vocabulary_.items()},
                   "idf": self.vectorizer.idf_.tolist()}
        save_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload)))

    @classmethod
    def load(cls, path: Path) -> TfidfText:
        payload = json.loads(path.read_text())
        text = cls(max_features=len(payload["vocabulary"]))
        params = payload["params"]
        text.vectorizer = TfidfVectorizer(vocabulary=payload["vocabulary"], ngram_range=tuple(params["ngram_range"]),
                                          sublinear_tf=params["sublinear_tf"], dtype=np.float32)
        text.vectorizer.idf_ = np.asarray(payload["idf"], dtype=np.float64)
        return text


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
        # Standardised inputs; missing values sit at the mean (0) and extreme values are clipped.
        x = torch.nan_to_num((dense - self.mean) / self.scale, nan=0.0).clamp(-10, 10)
        h = self.dense(x)
        if self.sparse is not None and bag is not None:
            h = h + self.sparse(bag[0], bag[1], per_sample_weights=bag[2])
        return self.head(h).squeeze(-1)


def _bag(matrix: sp.csr_matrix | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    if matrix is None:
        return None
    return (torch.from_numpy(matrix.indices.astype(np.int64)), torch.from_numpy(matrix.indptr[:-1].astype(np.int64)),
            torch.from_numpy(matrix.data.astype(np.float32)))


class MLPLearner(BaseLearner):
    name = "mlp"
    file_pattern = "fold{fold}.pt"

    @property
    def wants_text(self) -> bool:
        return self.config.models.mlp.tfidf

    def recorded_params(self) -> dict[str, Any]:
        cfg = self.config.models.mlp
        return {"objective": cfg.objective, "hidden": cfg.hidden, "dropout": cfg.dropout, "epochs": cfg.epochs,
                "batch_size": cfg.batch_size, "learning_rate": cfg.learning_rate, "weight_decay": cfg.weight_decay}

    def _loss(self) -> nn.Module:
        objective = check_objective("mlp", self.config.models.mlp.objective)
        return {"huber": nn.HuberLoss(delta=1.0), "l1": nn.L1Loss(), "l2": nn.MSELoss()}[objective]

    def _net(self, n_dense: int, n_sparse: int) -> PriceNet:
        cfg = self.config.models.mlp
        return PriceNet(n_dense, n_sparse, cfg.hidden, cfg.dropout)

    def fit(self, train: Inputs, y: np.ndarray, watch: Inputs, y_watch: np.ndarray) -> None:
        cfg = self.config.models.mlp
        torch.set_num_threads(threads(self.config))
        torch.manual_seed(self.seed)
        n_sparse = 0 if train.sparse is None else train.sparse.shape[1]
        self.net = self._net(train.dense.shape[1], n_sparse)
        with np.errstate(all="ignore"):
            mean = np.nan_to_num(np.nanmean(train.dense, axis=0))
            scale = np.nan_to_num(np.nanstd(train.dense, axis=0), nan=1.0)
        self.net.mean.copy_(torch.from_numpy(mean.astype(np.float32)))
        self.net.scale.copy_(torch.from_numpy(np.where(scale > 1e-6, scale, 1.0).astype(np.float32)))
        self.net.y_mean.fill_(float(y.mean()))
        self.net.y_scale.fill_(float(y.std()) or 1.0)
        target = torch.from_numpy(((y - y.mean()) / (y.std() or 1.0)).astype(np.float32))
        dense_params = [p for name, p in self.net.named_parameters() if not name.startswith("sparse.")]
        optimisers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(dense_params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)]
        if self.net.sparse is not None:
            optimisers.append(torch.optim.SparseAdam(list(self.net.sparse.parameters()), lr=cfg.learning_rate))
        loss_fn = self._loss()
        generator = torch.Generator().manual_seed(self.seed)
        best = (np.inf, copy.deepcopy(self.net.state_dict()), 0)
        for epoch in range(cfg.epochs):
            self.net.train()
            order = torch.randperm(len(train), generator=generator).numpy()
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                part = train.rows(batch)
                for optimiser in optimisers:
                    optimiser.zero_grad()
                loss = loss_fn(self.net(torch.from_numpy(part.dense), _bag(part.sparse)), target[batch])
                loss.backward()
                for optimiser in optimisers:
                    optimiser.step()
            watch_loss = float(np.abs(self.predict(watch) - y_watch).mean())
            if watch_loss < best[0]:
                best = (watch_loss, copy.deepcopy(self.net.state_dict()), epoch + 1)
            elif epoch + 1 - best[2] >= cfg.early_stopping_epochs:
                break
        self.net.load_state_dict(best[1])
        self.best_iteration = best[2]

    @torch.no_grad()
    def predict(self, x: Inputs) -> np.ndarray:
        self.net.eval()
        out = []
        for start in range(0, len(x), 4096):
            part = x.rows(np.arange(start, min(start + 4096, len(x))))
            out.append(self.net(torch.from_numpy(part.dense), _bag(part.sparse)).numpy())
        scaled = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        return scaled.astype(np.float64) * float(self.net.y_scale) + float(self.net.y_mean)

    def save(self, path: Path) -> None:
        save_atomic(path, lambda tmp: torch.save(self.net.state_dict(), tmp))

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)  # weights only: never unpickle objects
        n_sparse = state["sparse.weight"].shape[0] if "sparse.weight" in state else 0
        self.net = self._net(state["mean"].shape[0], n_sparse)
        self.net.load_state_dict(state)
