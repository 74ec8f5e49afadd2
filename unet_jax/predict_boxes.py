"""Box-prompted prediction from the command line: ``unet-jax predict IMAGE --model
litemedsam --box x0,y0,x1,y1``, or ``--boxes FILE.csv`` (one row per image: image path,
x0, y0, x1, y1 in that image's pixels; a relative path is relative to the CSV's folder; an
optional header row ``image,x0,y0,x1,y1``).

Everything is checked before the model loads and before anything is written
(:func:`plan_box_prompts`): the output folder (as :func:`unet_jax.predict.plan_prediction`),
each box (four numbers, ``x0 < x1``, ``y0 < y1``, inside its image), each CSV row's file,
and a row for every input image. Then each image gets ``X_mask.png``, ``X_overlay.png``
(the lesion's outline in red, the box in yellow, a legend) and optionally ``X_prob``, and
the run the per-image table ``predictions.csv`` / ``predictions.json`` of
:func:`unet_jax.predict.write_prediction_table`, whose ``recipe`` cell names the box and
states LiteMedSAM's BUSI contamination (:data:`unet_jax.inference.prompted.CONTAMINATION`).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from unet_jax.inference import connected_components
from unet_jax.inference.prompted import CONTAMINATION, BoxPromptedModel, segment_with_box
from unet_jax.plots import contour_overlay
from unet_jax.predict import (
    PredictionResult,
    load_image,
    plan_prediction,
    save_png,
    save_probability,
    unique_stem,
    write_prediction_table,
)

__all__ = ["BoxPlan", "parse_box", "read_box_table", "plan_box_prompts", "predict_with_boxes", "box_recipe"]

Box = tuple[float, float, float, float]
_HEADER = ("image", "x0", "y0", "x1", "y1")


@dataclasses.dataclass(frozen=True)
class BoxPlan:
    """What :func:`predict_with_boxes` does: ``prompts`` (image, box) in input order,
    ``skipped`` mask files, the checked output folder."""

    prompts: tuple[tuple[Path, Box], ...]
    skipped: tuple[PredictionResult, ...]
    out_dir: Path


def parse_box(text: str, where: str) -> Box:
    """``"x0,y0,x1,y1"`` as four floats; ValueError naming ``where`` and the value unless
    they are four finite numbers with ``x0 < x1`` and ``y0 < y1``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
        raise ValueError(
            f"{where}: box {text!r} is malformed; expected x0,y0,x1,y1: four numbers in the image's pixels "
            f"with x0 < x1 and y0 < y1"
        )
    return box  # type: ignore[return-value]


def _key(path: Path) -> str:
    return os.path.realpath(path)


def read_box_table(path: str | os.PathLike) -> dict[str, tuple[Path, Box]]:
    """The rows of a ``--boxes`` CSV keyed by each image's real path: ``(image, box)``.
    ValueError (naming the file, the row and the value) for an unreadable file, a row
    without five cells, a malformed box, an image that does not exist, or two rows for one
    image."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: cannot read the box table ({err}); expected a CSV file image,x0,y0,x1,y1") from None
    table: dict[str, tuple[Path, Box]] = {}
    for n, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        if not any(cells) or (n == 1 and tuple(c.lower() for c in cells) == _HEADER):
            continue
        if len(cells) != 5:
            raise ValueError(f"{path}: row {n} {row!r} has {len(cells)} cells; expected 5: image,x0,y0,x1,y1")
        image = path.parent / cells[0]
        box = parse_box(",".join(cells[1:]), f"{path}: row {n} ({cells[0]})")
        if not image.is_file():
            raise ValueError(f"{path}: row {n}: image {str(image)!r} does not exist; expected an existing image file")
        if _key(image) in table and table[_key(image)][1] != box:
            raise ValueError(f"{path}: row {n}: a second box for {str(image)!r}; expected one row per image")
        table[_key(image)] = (image, box)
    if not table:
        raise ValueError(f"{path}: no rows; expected one row image,x0,y0,x1,y1 per image")
    return table


def _check_inside(image: Path, box: Box) -> None:
    """ValueError unless ``box`` lies inside the image (its header read; an unreadable
    image is left to the prediction, which reports it as the other paths do)."""
    try:
        with Image.open(image) as im:
            width, height = im.size
    except Exception:  # noqa: BLE001 - PIL raises several types; reported when predicted
        return
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ValueError(
            f"{image}: box {','.join(f'{v:g}' for v in box)} lies outside the {width}x{height} image; "
            f"expected 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height}"
        )


def plan_box_prompts(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    box: str | None = None,
    boxes: str | os.PathLike | None = None,
) -> BoxPlan:
    """Every check before the model loads (see the module docstring). ``box``: one image's
    box text; ``boxes``: the CSV. Exactly one of them."""
    if (box is None) == (boxes is None):
        raise ValueError(
            "LiteMedSAM needs a box prompt: expected --box x0,y0,x1,y1 (one image) or --boxes FILE.csv, not both"
        )
    plan = plan_prediction(inputs, out_dir)
    if box is not None:
        if len(plan.images) != 1:
            raise ValueError(
                f"--box {box!r} is one image's box, got {len(plan.images)} images; expected one image, or "
                f"--boxes FILE.csv with a row per image"
            )
        prompts = [(plan.images[0], parse_box(box, f"{plan.images[0]}: --box"))]
    else:
        table = read_box_table(boxes)
        missing = [p for p in plan.images if _key(p) not in table]
        if missing:
            raise ValueError(
                f"{missing[0]}: no row in {str(boxes)!r} for this image ({len(missing)} input(s) without one); "
                f"expected a row path,x0,y0,x1,y1 for every input image"
            )
        prompts = [(p, table[_key(p)][1]) for p in plan.images]
    for image, b in prompts:
        _check_inside(image, b)
    return BoxPlan(tuple(prompts), plan.skipped, plan.out_dir)


def box_recipe(box: Box, threshold: float) -> str:
    """The table's ``recipe`` cell of a box-prompted prediction (contamination included)."""
    return f"LiteMedSAM box {','.join(f'{v:g}' for v in box)}, p > {threshold:g}; {CONTAMINATION}"


def _box_outline(box: Box, shape: tuple[int, int]) -> np.ndarray:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask = np.zeros(shape, bool)
    mask[max(y0, 0) : min(y1, shape[0] - 1) + 1, max(x0, 0) : min(x1, shape[1] - 1) + 1] = True
    return mask


def _predict_one(
    prompted: BoxPromptedModel, image: Image.Image, box: Box, stem: Path, save_probabilities: str | None
) -> dict:
    rgb = np.asarray(image.convert("RGB"))
    prob = segment_with_box(prompted, rgb, np.asarray(box, np.float32))
    mask = prob > prompted.threshold
    mask_path, overlay_path = stem.with_name(stem.name + "_mask.png"), stem.with_name(stem.name + "_overlay.png")
    legend = [
        "LiteMedSAM, box prompt (yellow)",
        f"max p(lesion) {float(prob.max()):.2f}",
        "BUSI may be in its pretraining",
        "(experiments/RESULTS.md)",
    ]
    overlay = contour_overlay(rgb, [(_box_outline(box, mask.shape), (255, 255, 0)), (mask, (255, 0, 0))], legend)
    probability = None if save_probabilities is None else str(save_probability(prob, stem, save_probabilities))
    save_png(mask.astype(np.uint8) * np.uint8(255), mask_path)
    save_png(overlay, overlay_path)
    return {
        "mask": str(mask_path),
        "overlay": str(overlay_path),
        "probability": probability,
        "lesion_fraction": float(mask.mean()),
        "lesion_present": bool(mask.any()),
        "max_probability": float(prob.max()),
        "area_px": int(mask.sum()),
        "components": connected_components(mask)[1],
        "recipe": box_recipe(box, prompted.threshold),
    }


def predict_with_boxes(
    prompted: BoxPromptedModel,
    plan: BoxPlan,
    progress: Callable[[int, int, PredictionResult], None] | None = None,
    save_probabilities: str | None = None,
) -> list[PredictionResult]:
    """Segment each planned image inside its box; write its mask, overlay (and probability
    map), then the per-image table. An unreadable image is reported (``error``) and
    skipped, as :func:`unet_jax.predict.predict_files` does; results in input order after
    the skipped mask files."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    results: list[PredictionResult] = list(plan.skipped)
    total = len(plan.skipped) + len(plan.prompts)
    used: set[str] = set()
    for n, (path, box) in enumerate(plan.prompts, start=len(plan.skipped) + 1):
        try:
            image = load_image(path)
        except ValueError as err:
            results.append(PredictionResult(str(path), error=str(err), recipe=box_recipe(box, prompted.threshold)))
        else:
            stem = plan.out_dir / unique_stem(path.stem, used)
            results.append(PredictionResult(str(path), **_predict_one(prompted, image, box, stem, save_probabilities)))
        if progress is not None:
            progress(n, total, results[-1])
    write_prediction_table(results, plan.out_dir)
    return results
