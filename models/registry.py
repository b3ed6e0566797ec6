"""Names the config and CLI use for base learners."""

from __future__ import annotations

from featurestore.config import Config
from models.base import BaseLearner
from models.gbdt import CatBoostLearner, LightGBMLearner, XGBoostLearner
from models.mlp import MLPLearner

LEARNERS: dict[str, type[BaseLearner]] = {
    "lgbm": LightGBMLearner,
    "xgb": XGBoostLearner,
    "catboost": CatBoostLearner,
    "mlp": MLPLearner,
}


def learner_class(name: str) -> type[BaseLearner]:
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; known: {sorted(LEARNERS)}")
    return LEARNERS[name]


def learner_tables(config: Config, name: str) -> list[str]:
    learner_class(name)
    return list(getattr(config.models, name).tables)


def register(name: str, cls: type[BaseLearner]) -> None:
    LEARNERS[name] = cls
