"""A run's model: built from its config, initialised, and run. The one place training,
evaluation, prediction and export get a model and its outputs from.

Every model of :mod:`unet_jax.models` maps ``(N, H, W, C)`` images in [0, 1] (and, for
box-prompted models, ``(N, 4)`` boxes ``x0, y0, x1, y1`` in pixels) to mask logits
``(N, H, W, K)``, class logits ``(N, K)``, or ``{"mask": ..., "class": ...}``;
:func:`run_model` returns them as one ``(mask_logits or None, class_logits or None)``
pair whatever the model.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from unet_jax.config import TrainConfig
from unet_jax.layers import onednn
from unet_jax.models.registry import create_model, model_fields, needs_box_prompts

__all__ = [
    "Outputs",
    "abstract_variables",
    "build_model",
    "init_variables",
    "model_heads",
    "run_model",
    "run_model_with_aux",
    "split_outputs",
]

Outputs = tuple[jax.Array | None, jax.Array | None]


def build_model(config: TrainConfig) -> Any:
    """The run's model: preset + overrides, the data's channels, the compute dtype, and
    with ``cpu_bf16`` the oneDNN bfloat16 convolutions where the model has the fields."""
    return create_model(
        config.preset,
        **{
            "in_channels": config.channels,
            **config.model,
            **onednn_fields(config),
            "dtype": None if config.dtype == "float32" else config.dtype,
        },
    )


def onednn_fields(config: TrainConfig) -> dict[str, str]:
    """The model fields that route a U-Net's convolutions (``lowering``) and
    up-convolutions (``up_method``) through oneDNN when ``config.cpu_bf16`` resolves to on
    (:func:`unet_jax.layers.onednn.use_onednn`); empty otherwise, or for models without
    those fields."""
    if not onednn.use_onednn(config.cpu_bf16):
        return {}
    fields = model_fields(config.preset)
    return {k: v for k, v in (("lowering", "onednn"), ("up_method", "onednn")) if k in fields}


def init_variables(model: Any, key: jax.Array, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """``model.init`` on zeros of ``input_shape`` (N, H, W, C) (and whole-image boxes for
    box-prompted models), jitted: one compiled program instead of hundreds of eager ops."""

    def init(key: jax.Array) -> dict[str, Any]:
        x = jnp.zeros(input_shape, jnp.float32)
        if needs_box_prompts(model):
            boxes = jnp.zeros((input_shape[0], 4), jnp.float32)
            return model.init(key, x, boxes, train=False)
        return model.init(key, x, train=False)

    return jax.jit(init)(key)


def abstract_variables(model: Any, config: TrainConfig) -> dict[str, Any]:
    """The shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) of ``model``'s variables at
    the config's input size ``(1, image_size, image_size, channels)``, traced abstractly:
    no FLOPs, no memory for the weights."""
    shape = (1, config.image_size, config.image_size, config.channels)
    return jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))


def split_outputs(out: Any) -> Outputs:
    """``(mask_logits (B, H, W, K) or None, class_logits (B, K) or None)`` of a model's output
    (an array of rank 4 or 2, or ``{"mask": ..., "class": ...}``)."""
    if isinstance(out, dict):
        return out.get("mask"), out.get("class")
    if out.ndim == 4:
        return out, None
    if out.ndim == 2:
        return None, out
    raise ValueError(
        f"model output of shape {tuple(out.shape)}: expected (B, H, W, K) mask logits, "
        f"(B, K) class logits or a dict of both"
    )


def run_model(
    apply_fn: Callable[..., Any],
    variables: dict[str, Any],
    images: jax.Array,
    boxes: jax.Array | None = None,
    *,
    train: bool = False,
    rngs: dict[str, jax.Array] | None = None,
) -> tuple[Outputs, dict[str, Any]]:
    """The model (``apply_fn``: ``model.apply``) on ``images`` (N, H, W, C) in [0, 1]:
    ``((mask_logits, class_logits), batch-norm updates)``.

    ``boxes`` (N, 4): the prompts of a box-prompted model. In training mode batch norm uses
    the batch's statistics and returns the new running averages, and ``rngs`` drives
    dropout; otherwise the updates are ``{}``.
    """
    outputs, _, updates = run_model_with_aux(apply_fn, variables, images, boxes, train=train, rngs=rngs)
    return outputs, updates


def run_model_with_aux(
    apply_fn: Callable[..., Any],
    variables: dict[str, Any],
    images: jax.Array,
    boxes: jax.Array | None = None,
    *,
    train: bool = False,
    rngs: dict[str, jax.Array] | None = None,
) -> tuple[Outputs, tuple[jax.Array, ...], dict[str, Any]]:
    """:func:`run_model` plus the deep-supervision logits a model returns in training
    (``UNet.deep_supervision``: ``(N, H/2, W/2, K), (N, H/4, W/4, K), ...``; ``()`` for
    models without them): ``(outputs, aux_logits, batch-norm updates)``."""
    extra = () if boxes is None else (boxes,)
    if not train:
        out, updates = apply_fn(variables, images, *extra, train=False), {}
    else:
        out, updates = apply_fn(variables, images, *extra, train=True, rngs=rngs, mutable=["batch_stats"])
    aux = tuple(out.get("aux", ())) if isinstance(out, dict) else ()
    return split_outputs(out), aux, updates


def model_heads(model: Any, config: TrainConfig) -> tuple[bool, bool]:
    """``(has_mask_head, has_class_head)`` of ``model`` at the config's input size, traced
    abstractly (no FLOPs)."""
    variables = abstract_variables(model, config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels), jnp.float32)
    boxes = jax.ShapeDtypeStruct((1, 4), jnp.float32) if needs_box_prompts(model) else None
    mask_logits, class_logits = jax.eval_shape(
        lambda v, x, b: run_model(model.apply, v, x, b)[0], variables, images, boxes
    )
    return mask_logits is not None, class_logits is not None
