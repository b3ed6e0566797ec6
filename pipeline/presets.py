"""Presets: `--preset best | medium | fast` (or `preset = "..."` in the config) trade score for time.

A preset is laid over the loaded config, before the command line's flags (featurestore.config.load_config):
- the config's own `[presets.<name>]` table when it has one: the recipe its author measured on that data
  (configs/mercari.toml has all three, with their measured cost and score);
- otherwise the generic rules below, which work on any config:
  - `best`: the config as written.
  - `medium`: without the learners that cost the most per point of CV on the catalogs measured here
    (`lgbm_text`, `catboost`, `finetune` and their variants); at most 50 stack candidates.
  - `fast`: no encoders (text/image embeddings, kNN prices; their tables leave every learner's and the stack's
    inputs), only `ridge`, `lgbm` and `mlp_sparse` (and their variants), one member per MLP fold, at most 20
    stack candidates. A learner left with no tables, or left the same as an earlier one (ridge_knn without its kNN
    table is ridge), is dropped.
The chosen preset is part of the config: every table's fingerprint sees the settings it changed, so switching
preset retrains what it changes and reuses the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from featurestore.config import PRESET_RULES, Config
from featurestore.errors import ConfigError

# Builders whose tables the `fast` rules drop: the encoders (minutes of CPU per 100k texts) and what reads them.
ENCODER_BUILDERS = ("text_emb", "image_files", "image_emb", "knn")


@dataclass(frozen=True)
class Rules:
    """What a generic preset changes (data, one instance per preset below)."""

    encoders: bool = True  # False: ENCODER_BUILDERS and their tables are left out
    kinds: tuple[str, ...] | None = None  # learners (by registered class) kept, variants included; None = all
    excluded_kinds: tuple[str, ...] = ()
    max_members: int | None = None  # models averaged per fold (MLPs' `members`)
    max_trials: int | None = None  # stack candidates


RULES: dict[str, Rules] = {
    "best": Rules(),
    "medium": Rules(excluded_kinds=("lgbm_text", "catboost", "finetune"), max_trials=50),
    "fast": Rules(encoders=False, kinds=("ridge", "lgbm", "mlp_sparse"), max_members=1, max_trials=20),
}


def preset_overrides(config: Config, name: str) -> dict[str, Any]:
    """The dotted overrides preset `name`'s generic rules make to `config` (registered with featurestore.config)."""
    from models.registry import learner_class, learner_settings, load_plugins
    from pipeline.registry import builders_for

    rules = RULES[name]
    load_plugins(config)
    builders = list(config.builders)
    dropped: set[str] = set()
    if not rules.encoders:
        dropped = {b.table for b in builders_for(config, [b for b in builders if b in ENCODER_BUILDERS])}
        builders = [b for b in builders if b not in ENCODER_BUILDERS]
    overrides: dict[str, Any] = {"builders": builders}
    learners: list[str] = []
    seen: set[str] = set()
    for learner in config.models.learners:
        cls = learner_class(learner, config)
        if (rules.kinds is not None and cls.name not in rules.kinds) or cls.name in rules.excluded_kinds:
            continue
        settings = learner_settings(config, learner)
        change: dict[str, Any] = {}
        tables = [t for t in settings.tables if t not in dropped]
        if tables != list(settings.tables):
            if not tables and not cls.reads_text:
                continue
            change["tables"] = tables
        members = getattr(settings, "members", None)
        if rules.max_members is not None and isinstance(members, int) and members > rules.max_members:
            change["members"] = rules.max_members
        same_as = f"{cls.name}:{replace(settings, **change)!r}"
        if same_as in seen:
            continue
        seen.add(same_as)
        learners.append(learner)
        overrides.update({f"models.{learner}.{key}": value for key, value in change.items()})
    if not learners:
        raise ConfigError(f"preset {name!r} leaves none of models.learners ({', '.join(config.models.learners)}); "
                          f"add one it keeps ({', '.join(rules.kinds or ())}) or define [presets.{name}] in the config")
    overrides["models.learners"] = learners
    overrides["stacking.raw_features"] = [f for f in config.stacking.raw_features
                                          if f.rpartition(".")[0] not in dropped]
    if rules.max_trials is not None:
        overrides["stacking.trials"] = min(config.stacking.trials, rules.max_trials)
    return overrides


PRESET_RULES.append(preset_overrides)
