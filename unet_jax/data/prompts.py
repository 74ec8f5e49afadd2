"""Box prompts from ground-truth masks, for box-prompted models (SAM).

As in MedSAM (Ma et al. 2024), a box prompt is the tight bounding box of the ground-truth
lesion, moved at random during training so the model does not learn to trust a perfect
box. Results of a box-prompted model are *prompted*: the box already tells it where the
lesion is, so they are not comparable with an unprompted segmenter's and are labelled so.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["boxes_from_masks"]


def boxes_from_masks(masks: jax.Array, *, jitter: float = 0.0, key: jax.Array | None = None) -> jax.Array:
    """Bounding boxes ``(B, 4)`` float32 ``(x0, y0, x1, y1)`` in pixel coordinates of masks ``(B, H, W, 1)``.

    ``x0, y0`` are the first and ``x1, y1`` the last row/column holding a foreground pixel
    (SAM's convention: corner coordinates, inclusive). An empty mask gets the whole image,
    ``(0, 0, W - 1, H - 1)``. With ``jitter > 0`` and a ``key``, every coordinate moves by
    a uniform amount in ``[-jitter, jitter] * max(H, W)`` pixels, then the box is clipped to
    the image and kept non-degenerate (``x1 >= x0``, ``y1 >= y0``).
    """
    if masks.ndim != 4 or masks.shape[-1] != 1:
        raise ValueError(f"boxes_from_masks: masks (B, H, W, 1) expected, got shape {tuple(masks.shape)}")
    _, height, width, _ = masks.shape
    fg = masks[..., 0] > 0.5
    rows, cols = jnp.any(fg, axis=2), jnp.any(fg, axis=1)  # (B, H), (B, W)

    def extent(present: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
        index = jnp.arange(size, dtype=jnp.float32)[None, :]
        first = jnp.min(jnp.where(present, index, float(size)), axis=1)
        last = jnp.max(jnp.where(present, index, -1.0), axis=1)
        empty = ~jnp.any(present, axis=1)
        return jnp.where(empty, 0.0, first), jnp.where(empty, float(size - 1), last)

    y0, y1 = extent(rows, height)
    x0, x1 = extent(cols, width)
    boxes = jnp.stack([x0, y0, x1, y1], axis=-1)
    if jitter > 0 and key is not None:
        shift = jax.random.uniform(key, boxes.shape, minval=-jitter, maxval=jitter) * max(height, width)
        boxes = boxes + shift
        limit = jnp.asarray([width - 1, height - 1, width - 1, height - 1], jnp.float32)[None, :]
        boxes = jnp.clip(boxes, 0.0, limit)
        x0, y0 = jnp.minimum(boxes[:, 0], boxes[:, 2]), jnp.minimum(boxes[:, 1], boxes[:, 3])
        x1, y1 = jnp.maximum(boxes[:, 0], boxes[:, 2]), jnp.maximum(boxes[:, 1], boxes[:, 3])
        boxes = jnp.stack([x0, y0, x1, y1], axis=-1)
    return boxes.astype(jnp.float32)
