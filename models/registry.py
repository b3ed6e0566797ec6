"""Names the config and CLI use for base learners: importing the learner modules registers them.

A new learner is one module with a `@register`ed class plus a `[models.<name>]` settings section; add its module
to `LEARNER_MODULES`. Nothing else names a concrete learner.
"""

from __future__ import annotations

import importlib

from featurestore.config import Config
from models.base import LEARNERS, BaseLearner, learner_settings

LEARNER_MODULES = ("models.gbdt", "models.mlp", "models.linear")

for _module in LEARNER_MODULES:
    importlib.import_module(_module)


def learner_class(name: str) -> type[BaseLearner]:
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; known: {', '.join(sorted(LEARNERS))}")
    return LEARNERS[name]


def learner_tables(config: Config, name: str) -> list[str]:
    learner_class(name)
    return list(learner_settings(config, name).tables)
