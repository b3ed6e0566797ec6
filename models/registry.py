"""Names the config and CLI use for base learners: importing the learner modules registers them.

A new learner is one module with a `@register`ed class (its settings dataclass beside it, extending
`models.base.LearnerSettings`) plus a `[models.<name>]` section: a module in models/learners/ is found by itself;
one kept elsewhere is named in `models.plugins`. This module holds the registry itself (`LEARNERS`, `register`),
variants, settings resolution and the load-time check of every section. Outside the learner modules, only
configs/default.toml (which documents each built-in learner's defaults, checked by a test) names a concrete
learner.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from typing import Any

from featurestore.config import SECTION_CHECKS, Config, apply_settings, import_plugins
from featurestore.errors import ConfigError
from models.base import BaseLearner, LearnerSettings

LEARNERS: dict[str, type[BaseLearner]] = {}
# The key of a `[models.<name>]` section that makes <name> a variant of another learner.
VARIANT_KEY = "learner"


def register(cls: type[BaseLearner]) -> type[BaseLearner]:
    """Class decorator: adds a learner under `cls.name`; a second class with the same name is refused."""
    name = getattr(cls, "name", "")
    if not name or not name.replace("_", "").isalnum():
        raise ConfigError(f"{cls.__name__}.name = {name!r}; expected letters, digits and '_'")
    if not (isinstance(cls.settings_type, type) and issubclass(cls.settings_type, LearnerSettings)):
        raise ConfigError(f"{cls.__module__}.{cls.__name__}.settings_type must be a dataclass extending "
                          "models.base.LearnerSettings")
    if name in LEARNERS and LEARNERS[name] is not cls:
        raise ConfigError(f"learner name {name!r} is taken by {LEARNERS[name].__module__}.{LEARNERS[name].__name__}; "
                         f"give {cls.__module__}.{cls.__name__} another `name`")
    LEARNERS[name] = cls
    return cls


def variant_base(config: Config, name: str) -> str | None:
    """The learner `[models.<name>] learner = "<base>"` makes <name> a variant of, or None. Variants are data of
    the config (name, base, settings), not classes: nothing about them outlives the config."""
    base = config.models.sections.get(name, {}).get(VARIANT_KEY)
    return base if isinstance(base, str) else None


def learner_settings(config: Config, name: str) -> Any:
    """The `[models.<name>]` section validated into the learner's settings (the one place settings are looked up):
    the learner's defaults, then the section's keys. A variant starts from its base learner's resolved settings."""
    base = variant_base(config, name)
    cls = learner_class(name, config)
    raw = {k: v for k, v in config.models.sections.get(name, {}).items() if k != VARIANT_KEY}
    start = copy.deepcopy(learner_settings(config, base)) if base is not None else cls.default_settings()
    return apply_settings(start, raw, f"models.{name}")


def check_sections(config: Config) -> None:
    """Every `[models.<name>]` section and every configured learner resolves (unknown keys, types, bounds), at
    load: plug-in modules are imported and variants registered first."""
    load_plugins(config)
    for name in dict.fromkeys([*config.models.sections, *config.models.learners]):
        learner_settings(config, name)


SECTION_CHECKS.append(check_sections)




def load_plugins(config: Config) -> None:
    """Import `models.plugins`, register the variants (`[models.<name>] learner = "<base>"`), and check that every
    other plug-in `[models.<name>]` section names a learner."""
    import_plugins(config.models.plugins, "models.plugins", "my_package.my_learner")
    # Variants are checked in dependency order, not section order: `[models.b] learner = "a"` may come before
    # `[models.a] learner = "lgbm"` in the file (that order used to be refused as "no learner of that name").
    pending = {name: raw[VARIANT_KEY] for name, raw in config.models.sections.items() if VARIANT_KEY in raw}
    resolved: set[str] = set()
    while pending:
        ready = [name for name, base in pending.items() if not (isinstance(base, str) and base in pending)]
        if not ready:
            cycle = " -> ".join(f"{n} = {b!r}" for n, b in pending.items())
            raise ConfigError(f"[models.*] {VARIANT_KEY}: the variants name each other in a cycle ({cycle}); one of "
                              "them must be a variant of a registered learner")
        for name in ready:
            _check_variant(name, pending.pop(name), resolved)
            resolved.add(name)
    unknown = sorted(set(config.models.sections) - set(LEARNERS) - resolved)
    if unknown:
        raise ConfigError(f"[models.{unknown[0]}]: no learner of that name is registered (known: "
                          f"{', '.join(sorted(LEARNERS))}); check the name or add its module to models.plugins")


def _check_variant(name: str, base: object, variants: set[str]) -> None:
    """A variant is a second copy of learner `base` under `name`: its own settings section (starting from the
    base's), its own `oof__<name>` table and model folder, so e.g. ridge with and without the kNN tables stack side
    by side. It must name a learner (or an earlier variant) and must not take a registered learner's name."""
    where = f"[models.{name}] {VARIANT_KEY}"
    if not isinstance(base, str) or (base not in LEARNERS and base not in variants):
        raise ConfigError(f"{where} = {base!r}: no learner of that name (known: {', '.join(sorted(LEARNERS))})")
    if name in LEARNERS:
        raise ConfigError(f"{where} = {base!r}: {name!r} is already a registered learner; give the variant another "
                          f"name, e.g. [models.{base}_2]")
    if not name.replace("_", "").isalnum():
        raise ConfigError(f"[models.{name}]: a variant's name takes letters, digits and '_'")


def learner_class(name: str, config: Config | None = None) -> type[BaseLearner]:
    """The class of learner `name`; with `config`, a variant's name resolves to its base learner's class."""
    # A chain of variants ends at a registered learner; a cycle (a config edited in code after load_plugins
    # refused it) stops after as many steps as there are sections and is reported as unknown.
    for _ in range(len(config.models.sections) if config is not None else 0):
        if name in LEARNERS or (base := variant_base(config, name)) is None:  # type: ignore[arg-type]
            break
        name = base
    if name not in LEARNERS:
        raise ConfigError(f"unknown learner {name!r}; known: {', '.join(sorted(LEARNERS))}")
    return LEARNERS[name]


def learner_tables(config: Config, name: str) -> list[str]:
    return list(learner_settings(config, name).tables)


# The built-in learners: every module of models/learners/ (after the definitions above, which they import).
import models.learners  # noqa: E402

for _info in pkgutil.iter_modules(models.learners.__path__):
    importlib.import_module(f"models.learners.{_info.name}")
