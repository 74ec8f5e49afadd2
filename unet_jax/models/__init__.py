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

from unet_jax.models.build import abstract_variables, build_model, init_variables, model_heads, run_model, split_outputs
from unet_jax.models.registry import (
    FAMILIES,
    apply_overrides,
    create_model,
    model_family,
    model_fields,
    model_names,
    needs_box_prompts,
)
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
    "abstract_variables",
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
    "apply_overrides",
    "build_model",
    "init_variables",
    "model_heads",
    "run_model",
    "split_outputs",
]
