"""Segmentation losses on logits, and on-device confusion counts.

Every function takes **logits** ``x`` (the model output, before the sigmoid; the project
convention) and masks ``y`` in ``{0, 1}`` of the *same* shape, ``(N, H, W, 1)`` or
``(N, H, W)``; the first axis is the batch, every other axis is a pixel axis. Shapes
must match exactly: broadcasting an ``(N, H, W)`` mask against ``(N, H, W, 1)`` logits
would silently build an ``(N, H, W, W)`` loss, so a mismatch is a ``ValueError``.

Losses (``p = sigmoid(x)``, sums over the pixels of one image unless stated)::

    BCE       L = -(1/M) sum_i [ w y_i log p_i + (1 - y_i) log(1 - p_i) ]     (report 3.1.2, w = 1)
    soft Dice L = 1 - (2 sum p y + s) / (sum p + sum y + s)                  (per image, then mean)
    BCE+Dice  L = a BCE + b Dice

All are pure, jittable and differentiable, return float32 scalars (or per-pixel /
per-image arrays on request), and accept any float logits dtype (computed in float32).

:func:`batch_confusion` gives per-image ``(tp, fp, fn, tn)`` pixel counts at a threshold,
so that train/eval steps can accumulate Dice, IoU and pixel accuracy on device; the
empty-mask conventions that turn counts into scores live in one place,
:func:`unet_jax.metrics.scores_from_confusion`, which accepts these jax arrays.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp

__all__ = [
    "softmax_cross_entropy",
    "binary_cross_entropy",
    "soft_dice_loss",
    "bce_dice_loss",
    "batch_confusion",
    "LOSSES",
    "get_loss",
]

Reduction = Literal["mean", "sum", "per_image", "none"]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_pair(logits: jax.Array, masks: jax.Array, where: str) -> tuple[jax.Array, jax.Array]:
    """Validate shapes (static, so this costs nothing under jit) and cast to float32."""
    if logits.shape != masks.shape:
        raise ValueError(
            f"{where}: logits {tuple(logits.shape)} and masks {tuple(masks.shape)} must have the "
            "same shape ((N, H, W, 1) or (N, H, W)); reshape the mask explicitly rather than "
            "relying on broadcasting"
        )
    if logits.ndim < 2:
        raise ValueError(f"{where}: expected a batch axis and pixel axes, got shape {tuple(logits.shape)}")
    return jnp.asarray(logits, jnp.float32), jnp.asarray(masks, jnp.float32)


def _pixel_axes(x: jax.Array) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _softplus(x: jax.Array) -> jax.Array:
    """``log(1 + e^x) = max(x, 0) + log1p(e^-|x|)``: no overflow for any finite ``x``."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def binary_cross_entropy(
    logits: jax.Array,
    masks: jax.Array,
    pos_weight: float | jax.Array | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
    """Binary cross-entropy of the report's section 3.1.2, computed from logits.

    The report writes, for ``M`` pixels with labels ``y`` and probabilities ``p``::

        L = -(1/M) sum_i [ y_i log p_i + (1 - y_i) log(1 - p_i) ],   p_i = sigmoid(x_i).

    With ``log p = -softplus(-x)``, ``log(1 - p) = -softplus(x)`` and
    ``softplus(-x) = softplus(x) - x`` each term becomes::

        l_i = w y_i (softplus(x_i) - x_i) + (1 - y_i) softplus(x_i)
            = max(x_i, 0) - x_i y_i + log1p(exp(-|x_i|))          (for w = 1),

    the log-sum-exp form. Why logits and not ``p``: in float32 ``sigmoid(x)`` rounds to
    exactly 1 for ``x > ~17`` (and to 0 below ~-104), so ``log(1 - p)`` becomes
    ``log(0) = -inf`` and its gradient NaN for a confidently wrong pixel; Keras avoids
    that by clipping ``p`` to ``[1e-7, 1 - 1e-7]``, which caps the loss at ~16.1 and zeroes
    its gradient there. The logit form is exact and finite for every finite ``x``, with
    gradient ``sigmoid(x) - y`` (for ``w = 1``).

    Args:
      logits: ``(N, H, W, 1)`` or ``(N, H, W)`` model outputs.
      masks: same shape, values in ``{0, 1}`` (soft labels in ``[0, 1]`` also work).
      pos_weight: ``w``, multiplies the ``y log p`` term (``> 1`` penalises missed lesion
        pixels more, as PyTorch's ``BCEWithLogitsLoss(pos_weight=...)``). ``None`` is
        ``w = 1``, the report's loss. The mean still divides by the pixel count ``M``,
        not by the summed weights.
      reduction: ``'mean'`` (the report's ``1/M`` over every pixel of the batch, a scalar),
        ``'sum'``, ``'per_image'`` (mean over each image's pixels, shape ``(N,)``) or
        ``'none'`` (per pixel, the input shape).
    """
    x, y = _check_pair(logits, masks, "binary_cross_entropy")
    sp = _softplus(x)
    if pos_weight is None:
        per_pixel = sp - x * y
    else:
        w = jnp.asarray(pos_weight, jnp.float32)
        per_pixel = w * y * (sp - x) + (1.0 - y) * sp
    if reduction == "mean":
        return jnp.mean(per_pixel)
    if reduction == "sum":
        return jnp.sum(per_pixel)
    if reduction == "per_image":
        return jnp.mean(per_pixel, axis=_pixel_axes(per_pixel))
    if reduction == "none":
        return per_pixel
    raise ValueError(f"unknown reduction {reduction!r}; expected 'mean', 'sum', 'per_image' or 'none'")


def soft_dice_loss(
    logits: jax.Array,
    masks: jax.Array,
    smooth: float = 1.0,
    per_image: bool = True,
) -> jax.Array:
    """Soft Dice loss ``1 - (2 sum p y + s) / (sum p + sum y + s)``, ``p = sigmoid(x)``.

    ``per_image=True`` (default): the sums run over each image's pixels, giving one loss
    per image, and the result is their mean, so a small lesion counts as much as a large
    one, matching the per-image Dice we report. ``per_image=False``: one "batch Dice"
    over all pixels of the batch (large lesions dominate; smoother with tiny batches).

    Empty ground truth (normal images): the loss is ``sum p / (sum p + s)``, 0 for an
    all-background prediction and rising quickly towards 1 as soon as the predicted area
    exceeds ``s`` pixels, so normal images teach the model to predict nothing. Without
    ``s`` it would be 0/0 there; ``s = 1`` also keeps the loss of a lesion image close to
    the true ``1 - Dice``. Gradients are finite everywhere for ``s > 0``.

    Returns a float32 scalar.
    """
    x, y = _check_pair(logits, masks, "soft_dice_loss")
    p = jax.nn.sigmoid(x)
    axes = _pixel_axes(x) if per_image else tuple(range(x.ndim))
    intersection = jnp.sum(p * y, axis=axes)
    total = jnp.sum(p, axis=axes) + jnp.sum(y, axis=axes)
    dice = (2.0 * intersection + smooth) / (total + smooth)
    return jnp.mean(1.0 - dice)


def bce_dice_loss(
    logits: jax.Array,
    masks: jax.Array,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
    pos_weight: float | jax.Array | None = None,
    smooth: float = 1.0,
) -> jax.Array:
    """``bce_weight * BCE + dice_weight * soft Dice``: BCE gives well-scaled per-pixel
    gradients from the first step, Dice counters the class imbalance (lesions are a small
    share of the pixels) and optimises the overlap we report. Float32 scalar."""
    bce = binary_cross_entropy(logits, masks, pos_weight=pos_weight)
    dice = soft_dice_loss(logits, masks, smooth=smooth)
    return bce_weight * bce + dice_weight * dice


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example categorical cross-entropy ``-log softmax(logits)[label]``: (B, K), (B,) -> (B,).

    The loss of the report's classifier rows (Keras ``sparse_categorical_crossentropy``),
    computed with a log-sum-exp so that large logits do not overflow.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"softmax_cross_entropy: logits (B, K) and labels (B,) expected, got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def batch_confusion(
    logits: jax.Array, masks: jax.Array, threshold: float = 0.5
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-image pixel counts ``(tp, fp, fn, tn)``, each float32 of shape ``(N,)``.

    A pixel is predicted positive when ``sigmoid(x) > threshold`` (the same rule as
    :func:`unet_jax.metrics.threshold`); ``masks`` are positive where ``> 0.5``. Jittable;
    float32 counts are exact up to 2**24 pixels per image (4096 x 4096). Turn the counts
    into per-image Dice / IoU / pixel accuracy with
    :func:`unet_jax.metrics.scores_from_confusion` and accumulate ``(sum, count)``.
    """
    x, y = _check_pair(logits, masks, "batch_confusion")
    pred = jax.nn.sigmoid(x) > threshold
    gt = y > 0.5
    axes = _pixel_axes(x)

    def count(a: jax.Array) -> jax.Array:
        return jnp.sum(a, axis=axes, dtype=jnp.float32)

    return count(pred & gt), count(pred & ~gt), count(~pred & gt), count(~pred & ~gt)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "bce": binary_cross_entropy,
    "dice": soft_dice_loss,
    "bce_dice": bce_dice_loss,
}


def get_loss(name: str, **kwargs: Any) -> LossFn:
    """The loss ``name`` from :data:`LOSSES` with its keyword options bound:
    ``(logits, masks) -> scalar``. Unknown names and options are a ``ValueError`` now,
    not a ``TypeError`` inside the first jitted step."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    fn = LOSSES[name]
    options = [p for p in inspect.signature(fn).parameters if p not in ("logits", "masks")]
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for loss {name!r}; expected some of {options}")
    if kwargs.get("reduction", "mean") != "mean":
        raise ValueError(f"loss {name!r} from get_loss must reduce to a scalar (reduction='mean')")
    return _bound(name, tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=None)
def _bound(name: str, options: tuple[tuple[str, Any], ...]) -> LossFn:
    # One object per (name, options): the loss is a static argument of the jitted steps, and
    # a new partial (hashed by identity) for the same loss would compile them again.
    return partial(LOSSES[name], **dict(options))
