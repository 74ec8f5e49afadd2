"""LiteMedSAM's official preprocessing and post-processing.

LiteMedSAM (the LiteMedSAM branch of bowang-lab/MedSAM; a TinyViT image encoder distilled
from MedSAM, Ma et al. 2024, "Segment anything in medical images", Nature
Communications, plus SAM's prompt encoder and mask decoder fine-tuned) is the
``litemedsam`` preset of :data:`unet_jax.models.sam.SAM_PRESETS`. Its released weights
are read, without torch, by :mod:`unet_jax.convert.litemedsam`.

Data caveat: MedSAM's training data credits the Breast Ultrasound dataset (Al-Dhabyani
et al. 2020, i.e. BUSI) and LiteMedSAM was distilled from MedSAM, so BUSI images (test
split included) may have been seen in pretraining. LiteMedSAM numbers on BUSI are not
unseen-data results.

The official 2-D inference (``CVPR24_LiteMedSAM_infer.py``), in one place here:

1. :func:`preprocess_image`: grayscale to 3 channels, longest side resized to 256
   (``round(side * 256 / max(H, W))``, area interpolation as OpenCV's ``INTER_AREA``),
   min-max normalised to ``[0, 1]`` over the whole resized image, zero-padded at the
   bottom/right to 256 x 256;
2. :func:`scale_box`: an xyxy box in original pixels times ``256 / max(H, W)``,
   truncated to integers;
3. the encoder on the padded image, the prompt encoder and mask decoder on the box
   (single-mask output);
4. :func:`postprocess_logits`: the ``(256, 256)`` low-resolution logits cropped to the
   resized size and bilinearly resized (no antialiasing) to ``(H, W)``; mask =
   ``sigmoid > 0.5`` (logit > 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_SIZE",
    "LiteMedSamInput",
    "area_resize",
    "preprocess_image",
    "scale_box",
    "box_from_mask",
    "postprocess_logits",
    "bilinear_matrix",
]

IMAGE_SIZE = 256


# --------------------------------------------------------------------------------------
# The official preprocessing and post-processing
# --------------------------------------------------------------------------------------
def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of area interpolation along one axis: output pixel ``i``
    covers ``[i s, (i + 1) s)`` input pixels (``s = n_in / n_out``) and averages them by
    overlap. For ``n_out <= n_in`` this is OpenCV's ``INTER_AREA``; when enlarging each
    output pixel takes the input pixel it falls in (OpenCV interpolates there instead)."""
    s = n_in / n_out
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        lo, hi = i * s, (i + 1) * s
        if s <= 1:
            m[i, min(int(np.floor(lo + s / 2)), n_in - 1)] = 1.0
            continue
        for k in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
            m[i, k] = min(hi, k + 1) - max(lo, k)
        m[i] /= m[i].sum()
    return m


def area_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(H, W, C)`` -> ``(size[0], size[1], C)`` float64 by area interpolation (see
    :func:`_area_matrix`), separably: rows then columns."""
    h, w = image.shape[:2]
    x = np.asarray(image, np.float64)
    x = np.einsum("ih,hwc->iwc", _area_matrix(h, size[0]), x)
    return np.einsum("jw,iwc->ijc", _area_matrix(w, size[1]), x)


@dataclasses.dataclass(frozen=True)
class LiteMedSamInput:
    """One preprocessed image: ``image`` float32 ``(256, 256, 3)`` in ``[0, 1]`` (padded),
    ``new_size`` the resized ``(h, w)`` before padding, ``original_size`` ``(H, W)``."""

    image: np.ndarray
    new_size: tuple[int, int]
    original_size: tuple[int, int]


def preprocess_image(image: np.ndarray, size: int = IMAGE_SIZE) -> LiteMedSamInput:
    """LiteMedSAM's official image preprocessing (see the module docstring): ``(H, W)``,
    ``(H, W, 1)`` or ``(H, W, 3)`` pixels (any range) -> :class:`LiteMedSamInput`.

    Raises:
      ValueError: not a 2-D grayscale or 3-channel image.
    """
    x = np.asarray(image)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3) or min(x.shape[:2]) < 1:
        raise ValueError(f"preprocess_image: expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {x.shape}")
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    h0, w0 = x.shape[:2]
    scale = size / max(h0, w0)
    newh, neww = int(h0 * scale + 0.5), int(w0 * scale + 0.5)
    r = area_resize(x, (newh, neww))
    lo, hi = r.min(), r.max()
    r = (r - lo) / np.clip(hi - lo, 1e-8, None)
    out = np.zeros((size, size, 3), np.float32)
    out[:newh, :neww] = r
    return LiteMedSamInput(out, (newh, neww), (h0, w0))


def scale_box(box: np.ndarray, original_size: tuple[int, int], size: int = IMAGE_SIZE) -> np.ndarray:
    """xyxy box(es) ``(..., 4)`` in original pixels -> the 256 frame: ``int(v * 256 /
    max(H, W))`` per coordinate (the reference's ``resize_box_to_256``), float32."""
    ratio = size / max(original_size)
    return np.trunc(np.asarray(box, np.float64) * ratio).astype(np.float32)


def box_from_mask(mask: np.ndarray) -> np.ndarray:
    """The tight xyxy box ``[x_min, y_min, x_max, y_max]`` (pixel indices, float32) of a
    binary ``(H, W)`` mask, as MedSAM's ``get_bbox`` without its random jitter.

    Raises:
      ValueError: the mask is empty (a box prompt needs a lesion).
    """
    ys, xs = np.nonzero(np.asarray(mask).reshape(mask.shape[0], mask.shape[1]))
    if ys.size == 0:
        raise ValueError(f"box_from_mask: the mask (shape {mask.shape}) is empty; expected a lesion")
    return np.asarray([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of PyTorch's bilinear resize along one axis
    (``align_corners=False``, no antialiasing): source ``(i + 0.5) n_in / n_out - 0.5``
    clamped at 0, interpolated between its two neighbours (the last one repeated)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def postprocess_logits(low_res: Any, new_size: tuple[int, int], original_size: tuple[int, int]) -> np.ndarray:
    """``(B, 256, 256, M)`` low-resolution logits -> ``(B, H, W, M)`` float32: crop to
    ``new_size``, then bilinear resize (PyTorch's ``align_corners=False``, as
    :func:`bilinear_matrix`) to ``original_size`` (``MedSAM_Lite.postprocess_masks``).
    Host-side NumPy (every image has its own size; a jitted resize would compile per size)."""
    x = np.asarray(low_res, np.float64)[:, : new_size[0], : new_size[1], :]
    mh = bilinear_matrix(x.shape[1], int(original_size[0]))
    mw = bilinear_matrix(x.shape[2], int(original_size[1]))
    return np.einsum("ih,bhwm,jw->bijm", mh, x, mw, optimize=True).astype(np.float32)
