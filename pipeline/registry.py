"""Names the CLI and config use for feature builders. Each factory may expand into several tables.

A new builder is one module with a `@register_builder` class (`name`, `reads`, optionally a `settings_type`
dataclass for its own `[features.<name>]` section): kept outside features/ and embeddings/, it is named in
`features.plugins`. The builder contract test (tests/test_builder_contract.py) covers every registered builder
without anyone listing it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from features.catalog import CatalogBuilder
from features.folds import FoldsBuilder
from features.ingest import ItemsBuilder
from features.target_encoding import TargetEncodingBuilder
from features.text_sparse import TextSparseBuilder
from featurestore.builders import FeatureBuilder, stale_tables
from featurestore.config import SECTION_CHECKS, Config, DataConfig, apply_settings, edited, import_plugins
from featurestore.errors import ConfigError, StaleTable
from featurestore.names import IMAGE_EMB_PREFIX, image_emb_table
from featurestore.store import FeatureStore, file_sha256

log = logging.getLogger(__name__)

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

    # A space must be an embedding table this config builds, or "concat". Image spaces of a catalog without images
    # (columns.image = "") are skipped, said in the log; any other unknown name (a typo, a model left out of
    # text_embeddings.models) is refused: it used to be dropped silently.
    built = {table_name(m) for m in config.text_embeddings.models}
    image_table = image_emb_table(config.images.alias)
    if config.columns.image:
        built.add(image_table)
    spaces = []
    for space in config.knn.spaces:
        needs = config.knn.concat if space == "concat" else [space]
        imageless = not config.columns.image
        unknown = [n for n in needs if n not in built and not (imageless and n.startswith(IMAGE_EMB_PREFIX))]
        if unknown:
            where = "knn.concat" if space == "concat" else "knn.spaces"
            raise ConfigError(f"{where} names {unknown[0]!r}, which this config does not build; known: "
                              f"{', '.join(sorted(built | {'concat'}))} (text_emb__<model> for each of "
                              "text_embeddings.models, image_emb__<images.alias> when columns.image is set)")
        if all(name in built for name in needs):
            spaces.append(space)
        else:
            log.info("knn: space %s skipped: this catalog has no images (columns.image = \"\")", space)
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
    """Adds a factory (one config -> its builders, possibly several tables) under `name`; a taken name is
    refused."""
    if not name or not name.replace("_", "").isalnum():
        raise ConfigError(f"feature builder name {name!r}: expected letters, digits and '_'")
    if name in REGISTRY and getattr(REGISTRY[name], "builder_class", None) is not getattr(factory, "builder_class",
                                                                                           False):
        raise ConfigError(f"feature builder name {name!r} is taken; give the new builder another `name`")
    REGISTRY[name] = factory


def register_builder(cls: type[FeatureBuilder]) -> type[FeatureBuilder]:
    """Class decorator: `builders = [..., cls.name]` then builds one `cls(config)` table."""
    def factory(config: Config) -> list[FeatureBuilder]:
        return [cls(config)]

    factory.builder_class = cls  # type: ignore[attr-defined]  # re-importing the same class is not a clash
    register(cls.name, factory)
    return cls


def load_builder_plugins(config: Config) -> None:
    """Import `features.plugins` (each registers its builders)."""
    import_plugins(config.features.plugins, "features.plugins", "my_package.my_builder")


def check_builder_sections(config: Config) -> None:
    """At load: plug-ins imported, every `builders` name registered, every `[features.<name>]` section a
    registered builder's own settings (unknown keys, types, bounds refused)."""
    load_builder_plugins(config)
    _require_registered(config.builders, "builders: ")
    for name, raw in config.features.sections.items():
        cls = getattr(REGISTRY.get(name), "builder_class", None)
        if cls is None or cls.settings_type is None:
            owners = sorted(n for n, f in REGISTRY.items() if getattr(getattr(f, "builder_class", None),
                                                                        "settings_type", None))
            raise ConfigError(f"[features.{name}]: no registered builder of that name takes settings (those that "
                              f"do: {', '.join(owners) or 'none'})")
        apply_settings(cls.settings_type(), raw, f"features.{name}")


SECTION_CHECKS.append(check_builder_sections)


def _require_registered(names: list[str], where: str = "") -> None:
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ConfigError(f"{where}unknown feature builder(s) {unknown}; known: {sorted(REGISTRY)} (a plug-in's "
                          "module goes in features.plugins)")


def builders_for(config: Config, names: list[str] | None = None) -> list[FeatureBuilder]:
    names = names if names is not None else config.builders
    _require_registered(names)
    builders: list[FeatureBuilder] = []
    for name in names:
        builders += REGISTRY[name](config)
    return builders


def _same_file(a: str, b: str) -> bool:
    if not a or not b:
        return a == b
    pa, pb = Path(a), Path(b)
    if pa.resolve() == pb.resolve():
        return True
    return pa.is_file() and pb.is_file() and file_sha256(pa) == file_sha256(pb)


def config_as_built(config: Config, store: FeatureStore) -> Config:
    """`config` with the train/test files the store's `items` was built from (`build-features --train X` then
    `stack` without `--train` must mean that same X, not the config's default file).

    A file the config names explicitly (not the default) that differs from the one the store was built from is
    refused, naming both: `stack` and `predict` used to go on with the old file, exit 0."""
    info = store.info("items")
    if info is None:
        return config
    paths: dict[str, str] = {}
    defaults = DataConfig()
    for key in ("train", "test"):
        # "data.train" since builders hash their declared reads; stores built before that say "train".
        recorded = info.params.get(f"data.{key}", info.params.get(key))
        asked = getattr(config.data, key)
        used = recorded if isinstance(recorded, str) else asked
        if _same_file(asked, used):
            paths[f"data.{key}"] = used  # the same bytes elsewhere: the store's own record of the path
            continue
        if asked != getattr(defaults, key):
            raise StaleTable(f"data.{key} is {asked!r}, but the store at {store.root} was built from {used!r}; "
                             f"run `python cli.py build-features` to rebuild it from {asked!r}, or point data.{key} "
                             f"back at {used!r}")
        log.info("using the %s file the store was built from, %s (the config's default is %s)", key, used, asked)
        paths[f"data.{key}"] = used
    return config if all(getattr(config.data, k[5:]) == v for k, v in paths.items()) else edited(config, paths)


def require_fresh(config: Config, store: FeatureStore, tables: set[str],
                  more_builders: list[FeatureBuilder] | None = None, fix: str = "python cli.py build-features") -> None:
    """Refuse to go on when any of `tables` (or what it reads) no longer matches its inputs: a train file
    changed or re-ingested, settings changed. Names each stale table and why."""
    stale = stale_tables(store, builders_for(config_as_built(config, store)) + (more_builders or []), tables)
    if stale:
        why = "; ".join(f"'{table}': {reason}" for table, reason in stale.items())
        raise StaleTable(f"stale table(s) in {store.root}: {why}. Run `{fix}` to rebuild them")
