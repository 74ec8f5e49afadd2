"""The model registry: every model named by a preset, in families (:data:`FAMILIES`);
:func:`create_model` builds any of them (each model checks its own fields when created),
:func:`model_fields` lists the fields a ``model.FIELD=value`` override may set, and
:func:`apply_overrides` applies a run's ``key=value`` overrides to its config, the model's
fields checked here, on the models side (``unet_jax.config`` imports no model code).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Sequence
from typing import Any

from unet_jax.config import TrainConfig, field_types, parse_value

__all__ = [
    "FAMILIES",
    "model_names",
    "model_family",
    "create_model",
    "model_fields",
    "needs_box_prompts",
    "apply_overrides",
]

# family -> (module, its preset table, its constructor). Imported on first use: the SAM
# port is large and most runs never touch it.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "unet": ("unet_jax.models.unet", "PRESETS", "create_unet"),
    "resnet": ("unet_jax.models.resnet", "RESNET_PRESETS", "create_resnet"),
    "efficientnet": ("unet_jax.models.efficientnet", "EFFICIENTNET_PRESETS", "create_efficientnet"),
    "sam": ("unet_jax.models.sam", "SAM_PRESETS", "create_sam"),
}


def _family_module(family: str) -> Any:
    return importlib.import_module(FAMILIES[family][0])


def model_names() -> dict[str, list[str]]:
    """Every preset name, by family."""
    return {family: sorted(getattr(_family_module(family), table)) for family, (_, table, _) in FAMILIES.items()}


def model_family(name: str) -> str:
    """The family of preset ``name``; an unknown name is a ValueError listing the known ones."""
    for family, (_, table, _) in FAMILIES.items():  # in order: most runs never import SAM
        if name in getattr(_family_module(family), table):
            return family
    known = sorted(n for members in model_names().values() for n in members)
    raise ValueError(f"unknown model preset {name!r}; expected one of {known}")


def create_model(name: str, **overrides: Any) -> Any:
    """The linen module of preset ``name`` with field ``overrides`` (e.g. ``dtype``)."""
    family = model_family(name)
    create = getattr(_family_module(family), FAMILIES[family][2])
    return create(name, **overrides)


def model_fields(name: str) -> dict[str, Any]:
    """The dataclass fields a ``model.FIELD=value`` override may set for preset ``name``."""
    cls = type(create_model(name))
    return {n: f for n, f in cls.__dataclass_fields__.items() if n not in ("parent", "name")}


def needs_box_prompts(model: Any) -> bool:
    """Whether ``model`` is called as ``model(images, boxes, train=...)`` (SAM)."""
    return bool(getattr(type(model), "box_prompts", False))


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """``config`` with ``key=value`` overrides; ``model.FIELD=value`` sets a field of the
    preset's model (the preset as overridden in the same list)."""
    types_ = field_types()
    changes: dict[str, Any] = {}
    model = dict(config.model)
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        pairs.append((item, key.strip(), text))
    model_items = [(item, key, text) for item, key, text in pairs if key.startswith("model.")]
    if model_items:
        preset = next((t for _, k, t in reversed(pairs) if k == "preset"), config.preset)
        fields = model_fields(preset)
        hints = typing.get_type_hints(type(create_model(preset)))
    for item, key, text in model_items:
        field = key[len("model.") :]
        if field not in fields:
            raise ValueError(
                f"override {item!r}: unknown model field {field!r} of preset {preset!r}; known: {sorted(fields)}"
            )
        model[field] = parse_value(key, text, hints.get(field, Any))
    for item, key, text in pairs:
        if key.startswith("model."):
            continue
        if key not in types_:
            raise ValueError(f"override {item!r}: unknown config key {key!r}; known keys: {sorted(types_)}")
        changes[key] = parse_value(key, text, types_[key])
    if model != config.model:
        changes["model"] = model
    if model_items:  # the model's own checks (a bad value names its field), before any work
        create_model(preset, **model)
    return dataclasses.replace(config, **changes)
