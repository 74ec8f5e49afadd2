"""Segment new images with a trained checkpoint: a mask PNG at each input's original size,
an overlay PNG (the prediction's red outline over the image, with a legend; or a red fill),
optionally the lesion probability map, and a per-image table (predictions.csv / .json).

Each input is preprocessed exactly as the training data (grayscale or RGB, bilinear resize
to the training size, /255); the probabilities are resized back (bilinear, then the
threshold). A bad input file is reported and skipped; the others are still predicted.
Outputs are written atomically (temporary file, then rename).

DICOM inputs (:mod:`unet_jax.data.dicom`: a ``.dcm`` name or the DICM marker) are read as
8-bit images by its rules; a multi-frame file is predicted frame by frame (``X_f001_mask.png``,
..., column ``frame``), and its pixel spacing fills ``area_mm2``. ``output_format``
"dicom-seg" also writes ``X_seg.dcm`` (:mod:`unet_jax.data.dicom_seg`) for each
single-frame DICOM input; it refuses non-DICOM inputs before the model loads.

Inputs named like masks (``*_mask*``, e.g. caught by ``F/*.png`` in a BUSI folder) are
skipped with a note; the output folder is checked before the model loads
(:func:`plan_prediction`): it must be writable and must not hold an input or a BUSI mask
(``X_mask.png`` beside its ``X.png``), nor any file at one of the outputs' names that predict
did not write (:func:`check_own_outputs`): a ground-truth ``X_mask.png`` without its image, a
user's ``predictions.csv`` or ``report.html``. predict's PNGs carry its mark (a PNG text chunk
``Software: unet-jax predict``); its other files are those its earlier ``predictions.json``
in that folder lists.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from unet_jax._io import atomic_write, write_json
from unet_jax.data.busi import IMAGE_MODES, preprocess_image
from unet_jax.data.dicom import is_dicom, read_dicom
from unet_jax.inference import (
    InferenceRecipe,
    LoadedModel,
    connected_components,
    effective_recipe,
    gate_decision,
    predict_outputs,
    recipe_mask,
)
from unet_jax.metrics import resize_mask
from unet_jax.models import needs_box_prompts
from unet_jax.plots import contour_overlay, overlay

__all__ = [
    "CLASS_NAMES",
    "MAX_PIXELS",
    "MIN_SIDE",
    "OUTPUT_FORMATS",
    "OVERLAY_STYLES",
    "PROBABILITY_FORMATS",
    "TABLE_COLUMNS",
    "PredictionPlan",
    "check_own_outputs",
    "csv_cell",
    "PredictionResult",
    "load_image",
    "plan_prediction",
    "predict_files",
    "save_png",
    "save_probability",
    "unique_stem",
    "write_prediction_table",
]

# The smallest image side predicted: below it an image holds no lesion to outline (a 1x1
# image would be upsampled to the model's input size and "segmented").
MIN_SIDE = 16
# The largest image predicted, in pixels (64 Mi: 8192 x 8192 or any shape of as many pixels).
# A native-size image costs ~20 bytes a pixel at its peak (probability map, mask, labels,
# overlay: +330 MB at 4096 x 4096, benchmarks/results/predict_native.json), so ~1.4 GB here
# and ~21 s on 2 cores, within a 2-core / 24 GiB machine; a larger image is refused, naming
# its size, before its pixels are decoded.
MAX_PIXELS = 8192 * 8192
_BUSI_MASK = re.compile(r"^(?P<image>.+)_mask(_\d+)?\.png$")
# predict's mark in every PNG it writes (a tEXt chunk), so that a later run knows its own files.
PNG_MARK = ("Software", "unet-jax predict")
# The files a run writes once, whatever its inputs (report.html: the command line's).
TABLE_FILES = ("predictions.csv", "predictions.json", "report.html")
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # a CSV cell a spreadsheet would run as a formula
CLASS_NAMES = ("benign", "malignant", "normal")  # the class head's order
PROBABILITY_FORMATS = ("png16", "npy")
OVERLAY_STYLES = ("contour", "fill")
OUTPUT_FORMATS = ("png", "dicom-seg")  # dicom-seg: the PNGs and a DICOM SEG per DICOM input
# The per-image table's columns (predictions.csv; predictions.json has the same keys).
TABLE_COLUMNS = (
    "input",
    "frame",
    "mask",
    "overlay",
    "seg",
    "probability",
    "lesion_present",
    "max_probability",
    "area_px",
    "area_mm2",
    "components",
    *(f"p_{name}" for name in CLASS_NAMES),
    "recipe",
    "gate_emptied",
    "gate_score",
    "error",
    "note",
)


@dataclasses.dataclass(frozen=True)
class PredictionResult:
    """One input: its outputs, or ``error`` (unreadable, not predicted), or ``note`` (skipped
    on purpose, e.g. a mask file).

    frame: the 1-based frame of a multi-frame DICOM input (None for a single image).
    seg: the DICOM SEG written (``output_format`` "dicom-seg"), or None.
    probability: the saved lesion probability map (``--save-probabilities``), or None.
    lesion_present: the final mask holds a lesion pixel (after the recipe, gate included).
    max_probability: the largest lesion probability of the model-resolution map the recipe
      used (flip-averaged under flip TTA).
    area_px: lesion pixels of the final mask (the image's native size); area_mm2: the same
      in mm^2 when a pixel spacing is known (DICOM inputs with a spacing; None for PNG/JPEG).
    components: 8-connected components of the final mask.
    class_probabilities: the class head's (benign, malignant, normal), or None without one.
    recipe: the recipe's description, or "raw".
    gate_emptied, gate_score: the gate's decision and score (None when the recipe has no gate).
    """

    input: str
    mask: str | None = None
    overlay: str | None = None
    lesion_fraction: float | None = None
    error: str | None = None
    note: str | None = None
    probability: str | None = None
    lesion_present: bool | None = None
    max_probability: float | None = None
    area_px: int | None = None
    area_mm2: float | None = None
    components: int | None = None
    class_probabilities: tuple[float, ...] | None = None
    recipe: str | None = None
    gate_emptied: bool | None = None
    gate_score: float | None = None
    frame: int | None = None
    seg: str | None = None

    def row(self) -> dict[str, Any]:
        """The table row (keys :data:`TABLE_COLUMNS`; None where a value does not apply)."""
        values = dataclasses.asdict(self)
        classes = self.class_probabilities or (None,) * len(CLASS_NAMES)
        values.update({f"p_{name}": p for name, p in zip(CLASS_NAMES, classes, strict=True)})
        return {column: values[column] for column in TABLE_COLUMNS}


@dataclasses.dataclass(frozen=True)
class PredictionPlan:
    """What :func:`predict_files` will do: ``images`` to predict, ``skipped`` results
    (mask files given as inputs), the output folder (checked)."""

    images: tuple[Path, ...]
    skipped: tuple[PredictionResult, ...]
    out_dir: Path
    stems: tuple[str, ...] = ()  # each image's output stem (X of X_mask.png), as :func:`unique_stem` gives


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
        beside = [f"{m['image']}{ext}" for ext in (".png", ".dcm")] if m is not None else []
        source = next((name for name in beside if (out_dir / name).is_file()), None)
        if source is not None:
            raise ValueError(
                f"output folder {str(out_dir)!r} holds the BUSI mask {entry.name!r} (beside its image "
                f"{source!r}), which a prediction would overwrite; expected another folder"
            )


def plan_prediction(
    inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, output_format: str = "png"
) -> PredictionPlan:
    """Check the output folder and sort the inputs, before any model is loaded.

    Mask files (``*_mask*``) are skipped with a note. Raises ValueError when no image is
    left, or ``out_dir`` is not writable (a file, under a file, no permission) or holds an
    input or a BUSI mask, or ``output_format`` is "dicom-seg" and an input is not DICOM.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format {output_format!r}; expected one of {list(OUTPUT_FORMATS)}")
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
    if output_format == "dicom-seg":
        for image in images:
            if image.is_file() and not is_dicom(image):
                raise ValueError(
                    f"{image}: not a DICOM file, and a DICOM SEG must reference its DICOM source image; "
                    f"expected DICOM inputs with --format dicom-seg (or --format png)"
                )
    _check_writable(out_dir)
    _check_not_sources(out_dir, images)
    used: set[str] = set()
    stems = tuple(unique_stem(p.stem, used) for p in images)
    check_own_outputs(out_dir, stems)
    return PredictionPlan(images, skipped, out_dir, stems)


def _listed_outputs(out_dir: Path) -> set[str] | None:
    """The file names an earlier run's ``predictions.json`` in ``out_dir`` lists (its table
    files included), or None when there is no such table."""
    try:
        rows = json.loads((out_dir / "predictions.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"input", "mask"} <= r.keys() for r in rows):
        return None
    columns = ("mask", "overlay", "probability", "seg")
    return {*TABLE_FILES, *(Path(str(r[c])).name for r in rows for c in columns if r.get(c))}


def _has_mark(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get(PNG_MARK[0]) == PNG_MARK[1]
    except Exception:  # noqa: BLE001 - not an image PIL reads: not one of ours
        return False


def check_own_outputs(out_dir: str | os.PathLike, stems: Sequence[str]) -> None:
    """Raise ValueError when ``out_dir`` holds a file at one of the names a prediction of
    ``stems`` writes (``X_mask.png``, ``X_f001_overlay.png``, ``X_prob.npy``, ``X_seg.dcm``,
    the table files) that predict did not write: neither carrying its PNG mark nor listed by
    the folder's earlier ``predictions.json``."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return
    names = "|".join(re.escape(stem) for stem in stems)
    pattern = re.compile(rf"^(?:{names})(?:_f\d{{3,}})?_(?:mask|overlay|prob|seg)\.(?:png|npy|dcm)$")
    listed = _listed_outputs(out_dir) or set()
    for entry in sorted(out_dir.iterdir()):
        if entry.name not in TABLE_FILES and pattern.match(entry.name) is None:
            continue
        if entry.name in listed or _has_mark(entry):
            continue
        raise ValueError(
            f"output folder {str(out_dir)!r} holds {entry.name!r}, which predict did not write and an "
            f"output of this run would overwrite; expected another folder (or move that file)"
        )


def save_png(array: np.ndarray, path: Path) -> None:
    """``array`` (uint8 or uint16, 2-D or RGB) as a PNG carrying predict's mark
    (:data:`PNG_MARK`), written atomically."""
    info = PngInfo()
    info.add_text(*PNG_MARK)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", pnginfo=info))


def load_image(path: Path) -> Image.Image:
    """One single-frame 8-bit image of at least ``MIN_SIDE`` pixels a side (CMYK converted
    to RGB); ValueError naming the file and what was expected otherwise."""
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected an image file (pass its images, e.g. {path / '*.png'})")
    try:
        with Image.open(path) as im:
            _check_size(path, im)  # from the header: a too large image is refused before decoding
            im.load()
            image = im.copy()
            frames = getattr(im, "n_frames", 1)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except _SizeError:
        raise
    except Exception as err:  # PIL raises several types for corrupt files
        raise ValueError(
            f"{path}: unreadable image ({type(err).__name__}: {err}); expected a PNG/JPEG/BMP/TIFF image"
        ) from None
    if frames > 1:
        raise ValueError(
            f"{path}: has {frames} frames (an animation or a multi-page file); expected a single "
            f"image (save the frame to segment as PNG)"
        )
    if image.mode == "CMYK":  # a CMYK JPEG: converted (PIL's conversion), not refused
        image = image.convert("RGB")
    if image.mode not in IMAGE_MODES:  # as the BUSI reader: 16-bit or float would be clipped
        raise ValueError(f"{path}: unsupported image mode {image.mode!r}; expected 8-bit {'/'.join(IMAGE_MODES)}")
    return image


class _SizeError(ValueError):
    """An image too small or too large to predict (raised from its header)."""


def _check_size(path: Path, image: Image.Image) -> None:
    if image.width < MIN_SIDE or image.height < MIN_SIDE:
        raise _SizeError(
            f"{path}: image of {image.width}x{image.height} pixels is too small; expected both sides "
            f"at least {MIN_SIDE} pixels"
        )
    if image.width * image.height > MAX_PIXELS:
        raise _SizeError(
            f"{path}: image of {image.width}x{image.height} pixels ({image.width * image.height / 1e6:.1f} "
            f"megapixels) is too large; expected at most {MAX_PIXELS} pixels ({MAX_PIXELS / 1e6:.1f} "
            f"megapixels, e.g. 8192x8192): crop or downscale it"
        )


@dataclasses.dataclass(frozen=True)
class _Options:
    """What every input of one :func:`predict_files` call is written with."""

    save_probabilities: str | None
    overlay_style: str
    output_format: str
    recipe: str  # the recipe's description, or "raw"


@dataclasses.dataclass(frozen=True)
class _Source:
    """One input read: its frames (one for a PNG), the (row, column) spacing in mm or None,
    and the DICOM header (None for other formats)."""

    frames: tuple[Image.Image, ...]
    spacing_mm: tuple[float, float] | None = None
    dicom: Any = None


def _read_source(path: Path, output_format: str) -> _Source:
    """A PNG/JPEG/... or a DICOM input; ValueError naming the file when it cannot be used."""
    if not is_dicom(path):
        return _Source((load_image(path),))
    dicom = read_dicom(path)
    for frame in dicom.frames:
        _check_size(path, frame)
    if output_format == "dicom-seg" and len(dicom.frames) > 1:
        raise ValueError(
            f"{path}: multi-frame DICOM ({len(dicom.frames)} frames): a DICOM SEG is written for "
            f"single-frame images only (highdicom needs a Frame of Reference and plane positions to "
            f"reference frames); expected a single-frame file with --format dicom-seg (without it, "
            f"every frame is predicted to PNG)"
        )
    return _Source(dicom.frames, dicom.spacing_mm, dicom.dataset)


def unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem_1``, ``stem_2``... when inputs from several folders share a name."""
    candidate, n = stem, 0
    while candidate in used:
        n += 1
        candidate = f"{stem}_{n}"
    used.add(candidate)
    return candidate


def save_probability(prob: np.ndarray, path_stem: Path, fmt: str) -> Path:
    """The native-size lesion probability map as a 16-bit PNG (0-65535) or float32 ``.npy``."""
    if fmt == "npy":
        path = path_stem.with_name(path_stem.name + "_prob.npy")

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a name
                np.save(f, prob.astype(np.float32))

        atomic_write(path, write)
        return path
    path = path_stem.with_name(path_stem.name + "_prob.png")
    save_png(np.round(np.clip(prob, 0.0, 1.0) * 65535.0).astype(np.uint16), path)
    return path


def _overlay_image(
    image: Image.Image, mask: np.ndarray, style: str, max_probability: float, class_prob: np.ndarray | None
) -> np.ndarray:
    """ "contour": the mask's 1-pixel red outline over the untouched image, with a legend (the
    maximum lesion probability, and the class head's probabilities); "fill": 40% red inside."""
    rgb = np.asarray(image.convert("RGB"))
    if style == "fill":
        return overlay(rgb, mask, color=(255, 0, 0))
    legend = [f"max p(lesion) {max_probability:.2f}"]
    if class_prob is not None:
        legend += [f"p({name}) {float(p):.2f}" for name, p in zip(CLASS_NAMES, class_prob, strict=True)]
    return contour_overlay(rgb, [(mask, (255, 0, 0))], legend=legend)


def _predict_image(
    loaded: LoadedModel,
    recipe: InferenceRecipe,
    image: Image.Image,
    stem: Path,
    save_probabilities: str | None,
    overlay_style: str,
) -> tuple[dict[str, Any], np.ndarray]:
    """Predict one image, write its mask, overlay (and probability map); return its result's
    fields and the mask, bool (H, W) at the image's size."""
    size = (image.size[1], image.size[0])
    x = preprocess_image(image, loaded.input_size, loaded.config.channels)
    probs, classes = predict_outputs(loaded, x[None], recipe.flip_tta, batch_size=1)
    prob, class_prob = probs[0], None if classes is None else classes[0]
    mask = recipe_mask(prob, class_prob, recipe, size)
    emptied, score = gate_decision(recipe, prob, class_prob)
    mask_path, overlay_path = stem.with_name(stem.name + "_mask.png"), stem.with_name(stem.name + "_overlay.png")
    save_png(mask.astype(np.uint8) * np.uint8(255), mask_path)
    save_png(_overlay_image(image, mask, overlay_style, float(np.max(prob)), class_prob), overlay_path)
    probability = None
    if save_probabilities is not None:
        native = resize_mask(np.asarray(prob, np.float32), size, t=None)
        probability = str(save_probability(native, stem, save_probabilities))
    fields = {
        "mask": str(mask_path),
        "overlay": str(overlay_path),
        "lesion_fraction": float(mask.mean()),
        "probability": probability,
        "lesion_present": bool(mask.any()),
        "max_probability": float(np.max(prob)),
        "area_px": int(mask.sum()),
        "components": connected_components(mask)[1],
        "class_probabilities": None if class_prob is None else tuple(float(p) for p in class_prob),
        "gate_emptied": None if recipe.gate == "none" else bool(emptied),
        "gate_score": score,
    }
    return fields, mask


def csv_cell(value: Any) -> Any:
    """One CSV cell: "" for None, numbers and booleans as they are, text starting with
    ``=``, ``+``, ``-`` or ``@`` (a formula to a spreadsheet) behind a single quote (OWASP's
    CSV-injection rule), so that ``=1+1.png`` reads ``'=1+1.png`` and never runs."""
    if value is None:
        return ""
    if isinstance(value, bool | int | float):
        return value
    text = str(value)
    return "'" + text if text[:1] in _FORMULA_STARTS else text


def write_prediction_table(results: Sequence[PredictionResult], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``predictions.csv`` and ``predictions.json`` (one row per result, columns
    :data:`TABLE_COLUMNS`; empty CSV cells / JSON nulls where a value does not apply). The
    CSV's text cells are escaped against formula injection (:func:`csv_cell`); the JSON
    holds the values as they are."""
    out_dir = Path(out_dir)
    rows = [r.row() for r in results]

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows([{k: csv_cell(v) for k, v in row.items()} for row in rows])

    csv_path = atomic_write(out_dir / "predictions.csv", write_csv)
    return csv_path, write_json(out_dir / "predictions.json", rows)


def _predict_source(
    loaded: LoadedModel, recipe: InferenceRecipe, path: Path, source: _Source, stem: Path, options: _Options
) -> list[PredictionResult]:
    """Every frame of one input (``X_f001``... for several frames), its area in mm^2 when the
    spacing is known, and its DICOM SEG (``options.output_format`` "dicom-seg"). When the
    SEG cannot be built, the input's files are removed again and it is reported as an error."""
    many = len(source.frames) > 1
    digits = max(3, len(str(len(source.frames))))
    results, masks, written = [], [], []
    for i, frame in enumerate(source.frames, start=1):
        frame_stem = stem.with_name(f"{stem.name}_f{i:0{digits}d}") if many else stem
        fields, mask = _predict_image(
            loaded, recipe, frame, frame_stem, options.save_probabilities, options.overlay_style
        )
        if source.spacing_mm is not None:
            fields["area_mm2"] = fields["area_px"] * source.spacing_mm[0] * source.spacing_mm[1]
        written += [fields["mask"], fields["overlay"], fields["probability"]]
        masks.append(mask)
        results.append(PredictionResult(str(path), frame=i if many else None, recipe=options.recipe, **fields))
    if options.output_format == "dicom-seg" and source.dicom is not None:
        # highdicom costs ~0.9 s to import: only --format dicom-seg pays it
        from unet_jax.data.dicom_seg import write_seg

        try:
            seg = write_seg(source.dicom, np.stack(masks), stem.with_name(stem.name + "_seg.dcm"))
        except ValueError as err:
            for name in filter(None, written):
                Path(name).unlink(missing_ok=True)
            return [PredictionResult(str(path), error=str(err))]
        results = [dataclasses.replace(r, seg=str(seg)) for r in results]
    return results


def _check_options(loaded: LoadedModel, save_probabilities: str | None, overlay_style: str) -> None:
    if overlay_style not in OVERLAY_STYLES:
        raise ValueError(f"overlay = {overlay_style!r}; expected one of {list(OVERLAY_STYLES)}")
    if save_probabilities is not None and save_probabilities not in PROBABILITY_FORMATS:
        raise ValueError(f"save_probabilities = {save_probabilities!r}; expected one of {list(PROBABILITY_FORMATS)}")
    if needs_box_prompts(loaded.model):
        raise ValueError(
            f"{loaded.step_dir}: {loaded.config.preset} is box-prompted and predict has no boxes to "
            f"give it; expected an unprompted segmentation model (evaluate prompts SAM from "
            f"ground-truth masks)"
        )


def predict_files(
    loaded: LoadedModel,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    threshold: float | None = None,
    flip_tta: bool | None = None,
    raw: bool = False,
    progress: Callable[[int, int, PredictionResult], None] | None = None,
    save_probabilities: str | None = None,
    overlay_style: str = "contour",
    output_format: str = "png",
) -> list[PredictionResult]:
    """Predict every input; write ``<stem>_mask.png`` (0/255), ``<stem>_overlay.png``
    (``save_probabilities`` "png16" / "npy": also ``<stem>_prob.png`` / ``<stem>_prob.npy``,
    the lesion probability map at the input's size) and, after all inputs, the per-image
    table ``predictions.csv`` / ``predictions.json`` (:func:`write_prediction_table`).

    The checkpoint's inference recipe is applied (``raw``: the model's own output);
    ``threshold`` and ``flip_tta`` override the recipe's. ``overlay_style``: "contour" (the
    mask's outline and a legend of the probabilities) or "fill" (40% red). ``output_format``
    "dicom-seg": also ``<stem>_seg.dcm`` per single-frame DICOM input (see the module
    docstring). Returns one result per input (per frame of a multi-frame DICOM):
    first the skipped mask files (``note`` set; see :func:`plan_prediction`, whose errors
    this raises), then the images in order; unreadable inputs have ``error`` set.
    """
    recipe = effective_recipe(loaded, threshold, flip_tta, raw)
    _check_options(loaded, save_probabilities, overlay_style)
    plan = plan_prediction(inputs, out_dir, output_format)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    results: list[PredictionResult] = list(plan.skipped)
    if progress is not None:
        for n, result in enumerate(plan.skipped, start=1):
            progress(n, len(inputs), result)
    options = _Options(save_probabilities, overlay_style, output_format, "raw" if raw else recipe.describe())
    for n, (path, stem) in enumerate(zip(plan.images, plan.stems, strict=True), start=len(plan.skipped) + 1):
        try:
            source = _read_source(path, output_format)
        except ValueError as err:
            new = [PredictionResult(str(path), error=str(err))]
        else:
            new = _predict_source(loaded, recipe, path, source, plan.out_dir / stem, options)
        results += new
        for result in new if progress is not None else ():
            progress(n, len(inputs), result)
    write_prediction_table(results, plan.out_dir)
    return results
