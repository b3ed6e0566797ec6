"""Names the CLI and config use for feature builders. Each factory may expand into several tables."""

from __future__ import annotations

from collections.abc import Callable

from features.base import FeatureBuilder
from features.catalog import CatalogBuilder
from features.folds import FoldsBuilder
from features.ingest import ItemsBuilder
from featurestore.config import Config

BuilderFactory = Callable[[Config], list[FeatureBuilder]]

REGISTRY: dict[str, BuilderFactory] = {
    "items": lambda config: [ItemsBuilder(config)],
    "folds": lambda config: [FoldsBuilder(config)],
    "catalog": lambda config: [CatalogBuilder(config)],
}


def register(name: str, factory: BuilderFactory) -> None:
    REGISTRY[name] = factory


def builders_for(config: Config, names: list[str] | None = None) -> list[FeatureBuilder]:
    names = names if names is not None else config.builders
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown feature builder(s) {unknown}; known: {sorted(REGISTRY)}")
    builders: list[FeatureBuilder] = []
    for name in names:
        builders += REGISTRY[name](config)
    return builders
