"""Segment new images with a trained checkpoint: a mask PNG at each input's original size,
and an overlay PNG (prediction in red over the image).

Each input is preprocessed exactly as the training data (grayscale or RGB, bilinear resize
to the training size, /255); the probabilities are resized back (bilinear, then the
threshold). A bad input file is reported and skipped; the others are still predicted.
Outputs are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from unet_jax._io import atomic_write
from unet_jax.data.busi import IMAGE_MODES, preprocess_image
from unet_jax.evaluate import LoadedModel, effective_recipe, predict_outputs
from unet_jax.inference import recipe_mask

__all__ = ["PredictionResult", "predict_files"]


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    input: str
    mask: str | None = None
    overlay: str | None = None
    lesion_fraction: float | None = None
    error: str | None = None


def _save_png(array: np.ndarray, path: Path) -> None:
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def _load(path: Path) -> Image.Image:
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected an image file (pass its images, e.g. {path / '*.png'})")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.copy()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as err:  # PIL raises several types for corrupt files
        raise ValueError(f"{path}: unreadable image ({type(err).__name__}: {err}); "
                         "expected a PNG/JPEG/BMP/TIFF image") from None
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


def predict_files(loaded: LoadedModel, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  threshold: float | None = None, flip_tta: bool | None = None, raw: bool = False,
                  progress: Callable[[int, int, PredictionResult], None] | None = None) -> list[PredictionResult]:
    """Predict every input; write ``<stem>_mask.png`` (0/255) and ``<stem>_overlay.png``.

    The checkpoint's inference recipe is applied (``raw``: the model's own output);
    ``threshold`` and ``flip_tta`` override the recipe's. Returns one result per input, in
    order; unreadable inputs have ``error`` set.
    """
    from unet_jax.models import needs_box_prompts
    from unet_jax.plots import overlay

    recipe = effective_recipe(loaded, threshold, flip_tta, raw)
    if needs_box_prompts(loaded.model):
        raise ValueError(f"{loaded.step_dir}: {loaded.config.preset} is box-prompted and predict has no boxes to "
                         f"give it; expected an unprompted segmentation model (evaluate prompts SAM from "
                         f"ground-truth masks)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {str(out_dir)!r} is a file; expected a folder (created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[PredictionResult] = []
    used: set[str] = set()
    for n, raw in enumerate(inputs, start=1):
        path = Path(raw)
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
