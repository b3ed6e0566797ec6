"""Names the CLI and config use for feature builders. Each factory may expand into several tables."""

from __future__ import annotations

import copy
from collections.abc import Callable

from features.catalog import CatalogBuilder
from features.folds import FoldsBuilder
from features.ingest import ItemsBuilder
from features.target_encoding import TargetEncodingBuilder
from features.text_sparse import TextSparseBuilder
from featurestore.builders import FeatureBuilder, stale_tables
from featurestore.config import Config
from featurestore.errors import StaleTable
from featurestore.store import FeatureStore

BuilderFactory = Callable[[Config], list[FeatureBuilder]]

def _text_embeddings(config: Config) -> list[FeatureBuilder]:
    from embeddings.text import TextEmbeddingBuilder

    return [TextEmbeddingBuilder(config, name) for name in config.text_embeddings.models]


def _image_files(config: Config) -> list[FeatureBuilder]:
    from embeddings.images import ImageFilesBuilder

    return [ImageFilesBuilder(config)] if config.columns.image else []


def _image_embeddings(config: Config) -> list[FeatureBuilder]:
    from embeddings.images import ImageEmbeddingBuilder

    return [ImageEmbeddingBuilder(config)] if config.columns.image else []


def _knn(config: Config) -> list[FeatureBuilder]:
    from embeddings.text import table_name
    from features.knn import KnnBuilder

    # Spaces whose embedding table this config does not build (no images, a model left out) are skipped.
    built = {table_name(m) for m in config.text_embeddings.models}
    if config.columns.image:
        built.add(f"image_emb__{config.images.alias}")
    spaces = []
    for space in config.knn.spaces:
        needs = config.knn.concat if space == "concat" else [space]
        if all(name in built for name in needs):
            spaces.append(space)
    return [KnnBuilder(config, space) for space in spaces]


# Catalogs without images (columns.image = "") skip the image builders.
REGISTRY: dict[str, BuilderFactory] = {
    "items": lambda config: [ItemsBuilder(config)],
    "folds": lambda config: [FoldsBuilder(config)],
    "catalog": lambda config: [CatalogBuilder(config)],
    "target_enc": lambda config: [TargetEncodingBuilder(config)],
    "text_sparse": lambda config: [TextSparseBuilder(config)],
    "text_emb": _text_embeddings,
    "image_files": _image_files,
    "image_emb": _image_embeddings,
    "knn": _knn,
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


def config_as_built(config: Config, store: FeatureStore) -> Config:
    """`config` with the train/test files the store's `items` was built from (`build-features --train X` then
    `stack` without `--train` must mean that same X, not the config's default file)."""
    info = store.info("items")
    if info is None:
        return config
    built = copy.deepcopy(config)
    built.data.train = info.params.get("train", built.data.train)
    built.data.test = info.params.get("test", built.data.test)
    return built


def require_fresh(config: Config, store: FeatureStore, tables: set[str],
                  more_builders: list[FeatureBuilder] | None = None, fix: str = "python cli.py build-features") -> None:
    """Refuse to go on when any of `tables` (or what it reads) no longer matches its inputs: a train file
    changed or re-ingested, settings changed. Names each stale table and why."""
    stale = stale_tables(store, builders_for(config_as_built(config, store)) + (more_builders or []), tables)
    if stale:
        why = "; ".join(f"'{table}': {reason}" for table, reason in stale.items())
        raise StaleTable(f"stale table(s) in {store.root}: {why}. Run `{fix}` to rebuild them")
