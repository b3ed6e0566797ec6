"""Names the config and CLI use for base learners: importing the learner modules registers them.

A new learner is one module with a `@register`ed class plus a `[models.<name>]` settings section: a module in
models/ is found by itself; one kept elsewhere is named in `models.plugins`. Nothing else names a concrete
learner.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from featurestore.config import Config, ConfigError
from models.base import LEARNERS, BaseLearner, learner_settings

# Modules of models/ that hold the protocol and the machinery, not learners.
_NOT_LEARNERS = {"base", "contract", "matrix", "metrics", "registry", "train"}

for _info in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if _info.name not in _NOT_LEARNERS:
        importlib.import_module(f"models.{_info.name}")


def load_plugins(config: Config) -> None:
    """Import `models.plugins` and check that every plug-in `[models.<name>]` section names a learner."""
    for module in config.models.plugins:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"models.plugins: cannot import {module!r} ({exc}); give an import path such as "
                              "'my_package.my_learner'") from exc
    unknown = sorted(set(config.models.plugin_settings) - set(LEARNERS))
    if unknown:
        raise ConfigError(f"[models.{unknown[0]}]: no learner of that name is registered (known: "
                          f"{', '.join(sorted(LEARNERS))}); check the name or add its module to models.plugins")


def learner_class(name: str) -> type[BaseLearner]:
    if name not in LEARNERS:
        raise ValueError(f"unknown learner {name!r}; known: {', '.join(sorted(LEARNERS))}")
    return LEARNERS[name]


def learner_tables(config: Config, name: str) -> list[str]:
    learner_class(name)
    return list(learner_settings(config, name).tables)
