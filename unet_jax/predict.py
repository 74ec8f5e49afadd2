"""Segment new images with a trained checkpoint: a mask PNG at each input's original size,
and an overlay PNG (prediction in red over the image).

Each input is preprocessed exactly as the training data (grayscale or RGB, bilinear resize
to the training size, /255); the probabilities are resized back (bilinear, then the
threshold). A bad input file is reported and skipped; the others are still predicted.
Outputs are written atomically (temporary file, then rename).

Inputs named like masks (``*_mask*``, e.g. caught by ``F/*.png`` in a BUSI folder) are
skipped with a note; the output folder is checked before the model loads
(:func:`plan_prediction`): it must be writable and must not hold an input or a BUSI mask
(``X_mask.png`` beside its ``X.png``), which the outputs' names would overwrite.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from unet_jax._io import atomic_write
from unet_jax.data.busi import IMAGE_MODES, preprocess_image
from unet_jax.inference import LoadedModel, effective_recipe, predict_outputs, recipe_mask

__all__ = ["MIN_SIDE", "PredictionPlan", "PredictionResult", "plan_prediction", "predict_files"]

# The smallest image side predicted: below it an image holds no lesion to outline (a 1x1
# image would be upsampled to the model's input size and "segmented").
MIN_SIDE = 16
_BUSI_MASK = re.compile(r"^(?P<image>.+)_mask(_\d+)?\.png$")


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    """One input: its outputs, or ``error`` (unreadable, not predicted), or ``note`` (skipped
    on purpose, e.g. a mask file)."""

    input: str
    mask: str | None = None
    overlay: str | None = None
    lesion_fraction: float | None = None
    error: str | None = None
    note: str | None = None


@dataclasses.dataclass(frozen=True)
class PredictionPlan:
    """What :func:`predict_files` will do: ``images`` to predict, ``skipped`` results
    (mask files given as inputs), the output folder (checked)."""

    images: tuple[Path, ...]
    skipped: tuple[PredictionResult, ...]
    out_dir: Path


def _is_mask_name(path: Path) -> bool:
    return "_mask" in path.stem


def _check_writable(out_dir: Path) -> None:
    """Raise ValueError unless ``out_dir`` is a folder that can be written, or can be
    created (nothing is created here)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {str(out_dir)!r} is a file; expected a folder (created if missing)")
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(
            f"output folder {str(out_dir)!r} cannot be created: {str(existing)!r} is a file; expected a folder path"
        )
    try:  # os.access says nothing true for root, nor on some network file systems: try it
        tempfile.TemporaryDirectory(dir=existing, prefix=".unet-jax-write-check-").cleanup()
    except OSError as err:
        raise ValueError(
            f"output folder {str(out_dir)!r} is not writable ({type(err).__name__}: "
            f"{err.strerror or err}); expected a folder you can write to"
        ) from None


def _check_not_sources(out_dir: Path, images: Sequence[Path]) -> None:
    """Refuse an output folder holding an input image or a BUSI ground-truth mask: the
    outputs ``X_mask.png`` would overwrite the masks (and outputs mix with inputs)."""
    if not out_dir.is_dir():
        return
    real = Path(os.path.realpath(out_dir))
    for image in images:
        if image.is_file() and Path(os.path.realpath(image)).parent == real:
            raise ValueError(
                f"output folder {str(out_dir)!r} holds the input {str(image)!r}; expected another "
                f"folder (predicted masks are named X_mask.png, as BUSI's ground truth)"
            )
    for entry in sorted(out_dir.iterdir()):
        m = _BUSI_MASK.match(entry.name)
        if m is not None and (out_dir / f"{m['image']}.png").is_file():
            raise ValueError(
                f"output folder {str(out_dir)!r} holds the BUSI mask {entry.name!r} (beside its image "
                f"{m['image'] + '.png'!r}), which a prediction would overwrite; expected another folder"
            )


def plan_prediction(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> PredictionPlan:
    """Check the output folder and sort the inputs, before any model is loaded.

    Mask files (``*_mask*``) are skipped with a note. Raises ValueError when no image is
    left, or ``out_dir`` is not writable (a file, under a file, no permission) or holds an
    input or a BUSI mask.
    """
    out_dir = Path(out_dir)
    paths = [Path(p) for p in inputs]
    images = tuple(p for p in paths if not _is_mask_name(p))
    skipped = tuple(
        PredictionResult(str(p), note=f"{p}: skipped: a mask file (its name has '_mask'), not an image to segment")
        for p in paths
        if _is_mask_name(p)
    )
    if not images:
        raise ValueError(
            f"no image to predict: all {len(paths)} input(s) are mask files (names with '_mask'); expected image files"
        )
    _check_writable(out_dir)
    _check_not_sources(out_dir, images)
    return PredictionPlan(images, skipped, out_dir)


def _save_png(array: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _load(path: Path) -> Image.Image:
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected an image file (pass its images, e.g. {path / '*.png'})")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
            frames = getattr(im, "n_frames", 1)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as err:  # PIL raises several types for corrupt files
        raise ValueError(
            f"{path}: unreadable image ({type(err).__name__}: {err}); expected a PNG/JPEG/BMP/TIFF image"
        ) from None
    if frames > 1:
        raise ValueError(
            f"{path}: has {frames} frames (an animation or a multi-page file); expected a single "
            f"image (save the frame to segment as PNG)"
        )
    if image.width < MIN_SIDE or image.height < MIN_SIDE:
        raise ValueError(
            f"{path}: image of {image.width}x{image.height} pixels is too small; expected both sides "
            f"at least {MIN_SIDE} pixels"
        )
    if image.mode == "CMYK":  # a CMYK JPEG: converted (PIL's conversion), not refused
        image = image.convert("RGB")
    if image.mode not in IMAGE_MODES:  # as the BUSI reader: 16-bit or float would be clipped
        raise ValueError(f"{path}: unsupported image mode {image.mode!r}; expected 8-bit {'/'.join(IMAGE_MODES)}")
    return image


def _unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_1``, ``stem_2``... when inputs from several folders share a name."""
    candidate, n = stem, 0
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def predict_files(
    loaded: LoadedModel,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    threshold: float | None = None,
    flip_tta: bool | None = None,
    raw: bool = False,
    progress: Callable[[int, int, PredictionResult], None] | None = None,
) -> list[PredictionResult]:
    """Predict every input; write ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png``.

    The checkpoint's inference recipe is applied (``raw``: the model's own output);
    ``threshold`` and ``flip_tta`` override the recipe's. Returns one result per input:
    first the skipped mask files (``note`` set; see :func:`plan_prediction`, whose errors
    this raises), then the images in order; unreadable inputs have ``error`` set.
    """
    from unet_jax.models import needs_box_prompts
    from unet_jax.plots import overlay

    recipe = effective_recipe(loaded, threshold, flip_tta, raw)
    if needs_box_prompts(loaded.model):
        raise ValueError(
            f"{loaded.step_dir}: {loaded.config.preset} is box-prompted and predict has no boxes to "
            f"give it; expected an unprompted segmentation model (evaluate prompts SAM from "
            f"ground-truth masks)"
        )
    plan = plan_prediction(inputs, out_dir)
    out_dir = plan.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[PredictionResult] = []
    for n, result in enumerate(plan.skipped, start=1):
        results.append(result)
        if progress is not None:
            progress(n, len(inputs), result)
    used: set[str] = set()
    for n, path in enumerate(plan.images, start=len(plan.skipped) + 1):
        try:
            image = _load(path)
        except ValueError as err:
            results.append(PredictionResult(str(path), error=str(err)))
            if progress is not None:
                progress(n, len(inputs), results[-1])
            continue
        x = preprocess_image(image, loaded.input_size, loaded.config.channels)
        probs, classes = predict_outputs(loaded, x[None], recipe.flip_tta, batch_size=1)
        mask = recipe_mask(probs[0], None if classes is None else classes[0], recipe, (image.size[1], image.size[0]))
        stem = _unique_stem(path.stem, used)
        mask_path, overlay_path = out_dir / f"{stem}_mask.png", out_dir / f"{stem}_overlay.png"
        _save_png(mask.astype(np.uint8) * np.uint8(255), mask_path)
        _save_png(overlay(np.asarray(image.convert("RGB")), mask, color=(255, 0, 0)), overlay_path)
        results.append(PredictionResult(str(path), str(mask_path), str(overlay_path), float(mask.mean())))
        if progress is not None:
            progress(n, len(inputs), results[-1])
    return results
