"""Model definitions: the U-Net family, the ResNet family and the Segment Anything port.

Every model is named by a preset; :func:`create_model` builds any of them, so a run's
config names its model with one string (``preset``) and overrides fields with
``model.FIELD=value``. The families:

* ``unet``: :mod:`unet_jax.models.unet` (``ronneberger``, ``seed``, ``padded``);
* ``resnet``: :mod:`unet_jax.models.resnet` (``resnet18_unet``, ``resnet34_unet``,
  ``resnet18_classifier``, ``resnet34_classifier``);
* ``sam``: :mod:`unet_jax.models.sam` (``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``,
  ``sam_tiny``, and ``litemedsam``: a TinyViT encoder with BatchNorm statistics, used
  through :func:`unet_jax.convert.load_litemedsam`), box-prompted.

Output conventions (logits throughout): a segmentation model returns ``(N, H, W, K)``; a
classifier ``(N, K)``; a model with both heads ``{"mask": ..., "class": ...}``.
"""

from __future__ import annotations

import importlib
from typing import Any

from unet_jax.models.unet import (
    DEFAULT_PRESET,
    PRESET_SIZES,
    PRESETS,
    ConvBlock,
    CropConcat,
    UNet,
    check_input_size,
    create_unet,
    fold_batch_norm,
    nearest_valid_sizes,
    unet_output_size,
)

__all__ = [
    "DEFAULT_PRESET",
    "PRESET_SIZES",
    "PRESETS",
    "ConvBlock",
    "CropConcat",
    "UNet",
    "check_input_size",
    "create_unet",
    "fold_batch_norm",
    "nearest_valid_sizes",
    "unet_output_size",
    "FAMILIES",
    "model_names",
    "model_family",
    "create_model",
    "model_fields",
    "needs_box_prompts",
    "build_model",
    "init_variables",
    "model_heads",
    "run_model",
    "split_outputs",
]

# family -> (module, its preset table, its constructor). Imported on first use: the SAM
# port is large and most runs never touch it.
FAMILIES: dict[str, tuple[str, str, str]] = {
    "unet": ("unet_jax.models.unet", "PRESETS", "create_unet"),
    "resnet": ("unet_jax.models.resnet", "RESNET_PRESETS", "create_resnet"),
    "sam": ("unet_jax.models.sam", "SAM_PRESETS", "create_sam"),
}


def _family_module(family: str) -> Any:
    return importlib.import_module(FAMILIES[family][0])


def model_names() -> dict[str, list[str]]:
    """Every preset name, by family."""
    return {family: sorted(getattr(_family_module(family), table))
            for family, (_, table, _) in FAMILIES.items()}


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


# Building and running a run's model (after the registry above, which it uses).
from unet_jax.models.build import build_model, init_variables, model_heads, run_model, split_outputs  # noqa: E402
