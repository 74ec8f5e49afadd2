"""Figures: training curves, prediction grids, and mask overlays.

matplotlib is imported inside the plotting functions (``import unet_jax`` stays light) and
used through ``matplotlib.figure.Figure`` with the Agg canvas, never ``pyplot``: no global
figure state, no backend selection, safe in threads and on headless machines.
:func:`overlay` and :func:`write_png` need only NumPy and PIL.

Every file is written atomically: to a temporary file in the target folder, then
``os.replace`` onto the final name, so a killed run never leaves a truncated PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unet_jax._io import atomic_write
from unet_jax.metrics import boundary

__all__ = [
    "GT_COLOR",
    "PRED_COLOR",
    "plot_training_curves",
    "prediction_grid",
    "overlay",
    "contour_overlay",
    "legend_size",
    "write_png",
    "to_rgb_uint8",
]

GT_COLOR: tuple[int, int, int] = (0, 200, 0)  # green: ground truth
PRED_COLOR: tuple[int, int, int] = (230, 0, 0)  # red: prediction

# The panels of the training-curve figure: (metric key, title), drawn when present.
# "accuracy" is the notebook's Keras name for what we log as pixel_accuracy.
_CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("loss", "Loss"),
    ("pixel_accuracy", "Accuracy (pixel accuracy)"),
    ("accuracy", "Accuracy"),
    ("dice", "Dice"),
    ("iou", "IoU"),
)


def _save_figure(fig: Any, path: str | os.PathLike, dpi: int) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def write_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3)`` array (or a bool mask, as 0/255) as a PNG,
    atomically. Returns the path."""
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        raise ValueError(f"write_png expects uint8 or bool, got {a.dtype}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    image = Image.fromarray(np.ascontiguousarray(a))
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` image, uint8 or float in [0, 1] -> uint8 RGB."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    return (np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _as_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.shape != shape:
        raise ValueError(f"mask of shape {m.shape} does not match the image's {shape}")
    return m > (0.5 if np.issubdtype(m.dtype, np.floating) else 0)


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = PRED_COLOR,
    alpha: float = 0.4,
    outline: bool = False,
) -> np.ndarray:
    """The image with ``mask`` painted in ``color``: uint8 ``(H, W, 3)``.

    Inside the mask ``out = (1 - alpha) image + alpha color`` (rounded); outside it the
    image is unchanged. ``outline=True`` also draws the mask's boundary pixels in the solid
    colour, which keeps small lesions visible. ``image``: ``(H, W)``, ``(H, W, 1)`` or
    ``(H, W, 3)``, uint8 or float in [0, 1]; ``mask``: ``(H, W)`` bool / {0,1} / probabilities
    (``> 0.5``).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = to_rgb_uint8(image)
    m = _as_mask(mask, rgb.shape[:2])
    out = rgb.copy()
    tint = np.asarray(color, np.float32)
    out[m] = np.round((1.0 - alpha) * rgb[m].astype(np.float32) + alpha * tint).astype(np.uint8)
    if outline:
        out[boundary(m)] = np.asarray(color, np.uint8)
    return out


def _contour(mask: np.ndarray, width: int) -> np.ndarray:
    """The mask's inner boundary band, ``width`` pixels thick (1: :func:`metrics.boundary`)."""
    band, rest = np.zeros_like(mask), mask
    for _ in range(width):
        edge = boundary(rest)
        band, rest = band | edge, rest & ~edge
    return band


def _legend_font() -> Any:
    return ImageFont.load_default()


def legend_size(lines: Sequence[str]) -> tuple[int, int]:
    """``(width, height)`` in pixels of the legend box :func:`contour_overlay` draws in the
    image's top-left corner for ``lines`` ((0, 0) for no lines)."""
    if not lines:
        return 0, 0
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox(
        (2, 2), "\n".join(lines), font=_legend_font()
    )
    return right + 3, bottom + 3


def contour_overlay(
    image: np.ndarray,
    contours: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
    legend: Sequence[str] = (),
    width: int = 1,
) -> np.ndarray:
    """The image with each mask's boundary drawn in its colour: uint8 ``(H, W, 3)``.

    ``contours``: ``(mask, colour)`` pairs drawn in order (a later one on top); a mask's
    contour is its boundary pixels (:func:`unet_jax.metrics.boundary`), ``width`` pixels
    thick inwards; every other pixel is the image's own. ``legend``: lines of text (PIL's
    default font, white on black) in the top-left box of :func:`legend_size`. ``image`` and
    masks as in :func:`overlay`.
    """
    if width < 1:
        raise ValueError(f"contour width must be at least 1 pixel, got {width}")
    rgb = to_rgb_uint8(image)
    out = rgb.copy()
    for mask, color in contours:
        out[_contour(_as_mask(mask, rgb.shape[:2]), width)] = np.asarray(color, np.uint8)
    if legend:
        canvas = Image.fromarray(out)
        w, h = legend_size(legend)
        draw = ImageDraw.Draw(canvas)
        draw.rectangle((0, 0, w - 1, h - 1), fill=(0, 0, 0))
        draw.multiline_text((2, 2), "\n".join(legend), fill=(255, 255, 255), font=_legend_font())
        out = np.asarray(canvas).copy()
    return out


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key``, skipping epochs where it is missing, None or NaN."""
    xs, ys = [], []
    for i, row in enumerate(history):
        v = row.get(key)
        if v is None:
            continue
        v = float(v)
        if math.isnan(v):
            continue
        xs.append(float(row.get("epoch", i + 1)))
        ys.append(v)
    return xs, ys


def plot_training_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str | None = None,
    dpi: int = 100,
    best_epoch: int | None = None,
    monitor: str = "val/loss",
) -> Path:
    """The report's training figures: one panel per metric, train and validation curves.

    ``history`` is one dict per epoch with keys ``"train/<metric>"`` and ``"val/<metric>"``
    (and optionally ``"epoch"``; else 1, 2, ...). Panels, in order, for the metrics present:
    loss, accuracy (pixel accuracy; the notebook's Keras "accuracy"), Dice, IoU. The epoch
    early stopping restores is marked by a dashed line: ``best_epoch`` when given (with the
    ``monitor`` it was chosen by), else the epoch with the lowest validation loss. Writes a
    PNG atomically and returns its path; ``ValueError`` if nothing to plot.
    """
    # Deferred, as in prediction_grid: matplotlib takes ~0.7 s to import, and `unet-jax predict`
    # imports this module for the overlays only.
    from matplotlib.figure import Figure

    panels = []
    for key, label in _CURVE_PANELS:
        curves = [(split, *_series(history, f"{split}/{key}")) for split in ("train", "val")]
        curves = [c for c in curves if c[1]]
        if curves:
            panels.append((label, curves))
    if not panels:
        raise ValueError(
            "plot_training_curves: no 'train/<metric>' or 'val/<metric>' values for any of "
            f"{[k for k, _ in _CURVE_PANELS]} in the history"
        )
    if best_epoch is None:
        best_x, best_y = _series(history, "val/loss")
        best_epoch = best_x[int(np.argmin(best_y))] if best_y else None
        monitor = "val/loss"
    best_label = f"best {monitor.replace('val/', 'val ')} (epoch {best_epoch:g})" if best_epoch is not None else ""

    fig = Figure(figsize=(4.5 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    styles = {"train": dict(color="tab:blue", label="train"), "val": dict(color="tab:orange", label="validation")}
    for ax, (label, curves) in zip(axes, panels):
        for split, xs, ys in curves:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, **styles[split])
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=0.8, label=best_label)
        ax.set_title(label)
        values = [y for _, _, ys in curves for y in ys if y > 0]
        if label.lower().startswith("loss") and values and max(values) > 100 * min(values):
            ax.set_yscale("log")  # an early validation spike (batch-norm warm-up) flattens the rest
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path, dpi)


def prediction_grid(
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    max_items: int = 16,
    ncols: int = 4,
    dpi: int = 100,
) -> Path:
    """A PNG grid of images with the ground truth (green) and the prediction (red).

    Each cell shows the image with the prediction as a translucent red overlay, and both
    masks' outlines as contours (green ground truth, red prediction), so overlap and
    misses read at a glance. Items may differ in size (native resolution); the first
    ``max_items`` are drawn. ``images``: ``(H, W[, C])`` uint8 or float in [0, 1];
    ``masks`` / ``preds``: ``(H, W[, 1])`` bool, {0,1} or probabilities. Returns the path.
    """
    # Deferred: matplotlib takes ~0.7 s to import (see plot_training_curves).
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = min(len(images), max_items)
    if n == 0:
        raise ValueError("prediction_grid: no images")
    if len(masks) < n or len(preds) < n:
        raise ValueError(f"prediction_grid: {len(images)} images but {len(masks)} masks and {len(preds)} predictions")
    if titles is not None and len(titles) < n:
        raise ValueError(f"prediction_grid: {len(titles)} titles for {n} items")
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.0 * cols, 3.1 * rows + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    gt_rgb, pred_rgb = (tuple(c / 255 for c in col) for col in (GT_COLOR, PRED_COLOR))
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= n:
            continue
        rgb = to_rgb_uint8(images[i])
        gt = _as_mask(masks[i], rgb.shape[:2])
        pred = _as_mask(preds[i], rgb.shape[:2])
        width = max(1, round(max(rgb.shape[:2]) / 150))  # about 2 screen pixels in a 3-inch cell
        tinted = overlay(rgb, pred, PRED_COLOR, alpha=0.25)
        ax.imshow(contour_overlay(tinted, [(gt, GT_COLOR), (pred, PRED_COLOR)], width=width), interpolation="nearest")
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize="small")
    fig.legend(
        handles=[
            Line2D([], [], color=gt_rgb, label="ground truth"),
            Line2D([], [], color=pred_rgb, label="prediction"),
        ],
        loc="outside lower center",
        ncols=2,
        fontsize="small",
    )
    return _save_figure(fig, path, dpi)
