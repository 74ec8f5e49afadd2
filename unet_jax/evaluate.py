"""Evaluation of a trained checkpoint on any folder in the BUSI layout.

The model sees each image at its training size; the predicted probabilities are resized
back to the image's native size (bilinear, then thresholded) and compared with the native
ground truth, unless ``native=False`` asks for the training resolution. Per-image metrics
and their aggregation (per class, over lesion images, with bootstrap confidence intervals,
and the empty-mask conventions) come from :mod:`unet_jax.metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax import metrics as M
from unet_jax._io import atomic_write
from unet_jax.checkpoint import (
    BEST,
    LATEST,
    LoadedModel,
    find_checkpoint,
    finished_steps,
    read_meta,
    restore_variables,
)
from unet_jax.config import TrainConfig, config_from_dict
from unet_jax.data import BusiDataset, ReadOptions, load_busi
from unet_jax.data.prompts import boxes_from_masks
from unet_jax.export import MODEL_FILE, is_exported, load_exported
from unet_jax.inference import RAW, InferenceRecipe, recipe_mask, tune_recipe
from unet_jax.models import build_model, init_variables, needs_box_prompts, run_model

__all__ = ["LoadedModel", "NO_RECIPE", "load_checkpoint", "read_recipe", "read_recipe_file", "recipe_status",
           "resolve_threshold",
           "predict_probabilities",
           "predict_class_probabilities", "predict_outputs", "effective_recipe", "evaluate_dataset",
           "evaluate_classification", "evaluation_report", "read_for_evaluation", "tune_inference",
           "save_recipe", "prompt_boxes", "RECIPE_FILE"]

RECIPE_FILE = "inference.json"


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None) -> LoadedModel:
    """Load ``path`` (a run folder, ``checkpoints/best`` or a step folder).

    ``expect``: model fields the caller requires (e.g. ``{"preset": "padded"}``); a
    checkpoint of another architecture is a ``ValueError`` saying what differs.
    """
    if is_exported(path):
        loaded = load_exported(path)
        _check_expected(loaded.config, expect, Path(path))
        return loaded
    if Path(path).is_dir() and any(Path(path).glob("member_*.msgpack")):  # an export that lost its model.json
        raise ValueError(f"exported model {str(path)!r} has no {MODEL_FILE}: {str(Path(path) / MODEL_FILE)!r} does "
                         f"not exist; expected the file written by `unet-jax export` beside its member_*.msgpack")
    step_dir = find_checkpoint(path)
    meta = read_meta(step_dir)
    if "config" not in meta:
        raise ValueError(f"checkpoint {str(step_dir)!r} has no saved config; expected one written by `unet-jax train`")
    config = config_from_dict(meta["config"], source=f"{step_dir}/meta")
    _check_expected(config, expect, step_dir)
    model = build_model(config)
    shape = (1, config.image_size, config.image_size, config.channels)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))
    variables = restore_variables(step_dir, abstract)
    recipe_file = step_dir / RECIPE_FILE
    return LoadedModel(model, variables, config, step_dir, read_recipe(step_dir),
                       recipe_source=str(recipe_file) if recipe_file.is_file() else None)


def _check_expected(config: TrainConfig, expect: dict[str, Any] | None, where: Path) -> None:
    for key, value in (expect or {}).items():
        if getattr(config, key) != value:
            raise ValueError(f"checkpoint {str(where)!r} holds {key}={getattr(config, key)!r}; "
                             f"expected {key}={value!r}")


def read_recipe(step_dir: Path) -> InferenceRecipe:
    """The recipe saved beside a checkpoint (``<step>/inference.json``), else RAW."""
    path = Path(step_dir) / RECIPE_FILE
    return read_recipe_file(path) if path.is_file() else RAW


def read_recipe_file(path: str | Path) -> InferenceRecipe:
    """The recipe in ``path``: an ``inference.json`` as `unet-jax train` or
    experiments/oof.py writes it (``{"recipe": {...}, ...}``), or a bare recipe object."""
    import json

    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"inference recipe {str(path)!r} could not be read ({err}); expected an inference.json "
                         f"file") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"inference recipe {str(path)!r} is not valid JSON ({err}); expected the file "
                         f"written by `unet-jax train` (delete it to use the raw model output)") from err
    if not isinstance(values, dict):
        raise ValueError(f"inference recipe {str(path)!r} holds {type(values).__name__}; expected a JSON object")
    return InferenceRecipe.from_dict(values.get("recipe", values), source=str(path))


def save_recipe(loaded: LoadedModel, recipe: InferenceRecipe, report: dict[str, Any] | None = None,
                run_dir: Path | None = None) -> None:
    """Write the recipe (and its validation report) beside the checkpoint, and a copy in
    the run folder for reading."""
    import json

    text = json.dumps(M.to_jsonable({"recipe": recipe.to_dict(), "validation": report}), indent=2) + "\n"
    for folder in {Path(loaded.step_dir), *(() if run_dir is None else (Path(run_dir),))}:
        atomic_write(folder / RECIPE_FILE, lambda tmp: Path(tmp).write_text(text))


NO_RECIPE = "raw model output, no tuned recipe"


def recipe_status(loaded: LoadedModel, raw: bool = False) -> dict[str, Any]:
    """What evaluate and predict apply, for their output and report: ``tuned`` (a tuned
    recipe is applied), ``source`` (its file) and ``description`` (a sentence; with no
    recipe found it says "raw model output, no tuned recipe" and where one was looked for)."""
    if raw:
        return {"tuned": False, "source": None, "description": "raw model output (requested)"}
    if loaded.recipe_tuned:
        return {"tuned": True, "source": loaded.recipe_source,
                "description": f"tuned recipe{f' from {loaded.recipe_source}' if loaded.recipe_source else ''}: "
                               f"{loaded.recipe.describe()}"}
    where = Path(loaded.step_dir)
    hint = ""
    if where.parent.name == LATEST and any((s / RECIPE_FILE).is_file()
                                           for s in finished_steps(where.parent.parent / BEST)):
        hint = f"; the run's best checkpoint has one: pass the run folder {str(where.parent.parent.parent)!r}"
    return {"tuned": False, "source": None,
            "description": f"{NO_RECIPE} (no {RECIPE_FILE} with {str(where)!r}{hint})"}


def resolve_threshold(loaded: LoadedModel, threshold: float | None) -> float:
    """``threshold``, or the checkpoint's own when None; a value outside (0, 1) is an error
    (at 0 or 1 every pixel, or none, would be predicted a lesion)."""
    t = loaded.config.threshold if threshold is None else threshold
    if not (isinstance(t, (int, float)) and 0 < t < 1):
        raise ValueError(f"threshold {t!r}: expected a probability in (0, 1), e.g. 0.5")
    return float(t)


def _outputs(model: Any, variables: dict[str, Any], x: jax.Array, boxes: jax.Array | None) -> Any:
    return run_model(model.apply, variables, x, boxes)[0]


@functools.partial(jax.jit, static_argnames=("model", "flip"))
def _probabilities(model: Any, variables: dict[str, Any], images_u8: jax.Array, boxes: jax.Array | None,
                   flip: bool) -> tuple[jax.Array | None, jax.Array | None]:
    x = images_u8.astype(jnp.float32) / 255.0
    mask_logits, class_logits = _outputs(model, variables, x, boxes)
    prob = None if mask_logits is None else jax.nn.sigmoid(mask_logits[..., 0])
    if flip and prob is not None:  # test-time augmentation: average with the mirrored image's prediction
        width = x.shape[2]
        mirrored_boxes = None if boxes is None else jnp.stack(
            [width - 1 - boxes[:, 2], boxes[:, 1], width - 1 - boxes[:, 0], boxes[:, 3]], axis=-1)
        mirrored, _ = _outputs(model, variables, x[:, :, ::-1], mirrored_boxes)
        prob = 0.5 * (prob + jax.nn.sigmoid(mirrored[..., 0])[:, :, ::-1])
    return prob, (None if class_logits is None else jax.nn.softmax(class_logits, axis=-1))


def _member_outputs(loaded: LoadedModel, chunk: np.ndarray, box_chunk: np.ndarray | None,
                    flip_tta: bool) -> tuple[Any, Any]:
    """Both heads' probabilities for one batch, averaged over the ensemble's members."""
    prob_sum, class_sum = None, None
    for variables in loaded.all_variables:
        prob, cls = _probabilities(loaded.model, variables, jnp.asarray(chunk),
                                   None if box_chunk is None else jnp.asarray(box_chunk), flip_tta)
        prob_sum = prob if prob_sum is None else prob_sum + prob
        class_sum = cls if class_sum is None else class_sum + cls
    k = len(loaded.all_variables)
    return (None if prob_sum is None else prob_sum / k), (None if class_sum is None else class_sum / k)


def _batched_heads(loaded: LoadedModel, images_u8: np.ndarray, boxes: np.ndarray | None, batch_size: int,
                   flip_tta: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Both heads' probabilities over ``images_u8`` in fixed-size batches, one model pass
    per batch (and member); None for a head the model lacks."""
    n = images_u8.shape[0]
    if needs_box_prompts(loaded.model) and boxes is None:
        raise ValueError(f"{loaded.config.preset} is box-prompted: expected boxes (N, 4) with the images")
    parts: list[tuple[Any, Any]] = []
    for start in range(0, n, batch_size):
        chunk = images_u8[start : start + batch_size]
        box_chunk = None if boxes is None else np.asarray(boxes[start : start + batch_size], np.float32)
        pad = batch_size - chunk.shape[0]
        if pad:  # every batch reuses one compiled program
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
            if box_chunk is not None:
                box_chunk = np.concatenate([box_chunk, np.repeat(box_chunk[:1], pad, axis=0)])
        prob, cls = _member_outputs(loaded, chunk, box_chunk, flip_tta)
        parts.append(tuple(None if h is None else np.asarray(h)[: batch_size - pad] for h in (prob, cls)))
    if not parts:
        return np.empty((0,), np.float32), None
    return tuple(None if parts[0][k] is None else np.concatenate([p[k] for p in parts]) for k in (0, 1))


def _batched(loaded: LoadedModel, images_u8: np.ndarray, boxes: np.ndarray | None, batch_size: int,
             flip_tta: bool, which: int) -> np.ndarray:
    out = _batched_heads(loaded, images_u8, boxes, batch_size, flip_tta)[which]
    if out is None:
        head = "mask" if which == 0 else "class"
        raise ValueError(f"{loaded.config.preset} has no {head} head; expected a "
                         f"{'segmentation' if which == 0 else 'classification'} model")
    return out


def predict_probabilities(loaded: LoadedModel, images_u8: np.ndarray, batch_size: int = 16,
                          flip_tta: bool = False, boxes: np.ndarray | None = None) -> np.ndarray:
    """Foreground probabilities (N, H, W) float32 for uint8 images (N, H, W, C) at the
    training size. Box-prompted models need ``boxes`` (N, 4) xyxy in those pixels."""
    return _batched(loaded, images_u8, boxes, batch_size, flip_tta, 0)


def predict_class_probabilities(loaded: LoadedModel, images_u8: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Class probabilities (N, K) (softmax; benign, malignant, normal) of a model with a class head."""
    return _batched(loaded, images_u8, None, batch_size, False, 1)


def predict_outputs(loaded: LoadedModel, images_u8: np.ndarray, flip_tta: bool = False,
                    batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(mask probabilities (N, H, W), class probabilities (N, K) or None)`` of an
    unprompted segmenter (its ensemble members averaged)."""
    probs, classes = _batched_heads(loaded, images_u8, None, batch_size or loaded.config.eval_batch_size, flip_tta)
    if probs is None:
        raise ValueError(f"{loaded.config.preset} has no mask head; expected a segmentation model")
    return probs, classes


def effective_recipe(loaded: LoadedModel, threshold: float | None = None, flip_tta: bool | None = None,
                     raw: bool = False) -> InferenceRecipe:
    """The recipe evaluate/predict apply: the checkpoint's own (RAW with the config's
    threshold when ``raw``), with an explicit threshold or TTA choice laid over it."""
    recipe = dataclasses.replace(RAW, threshold=loaded.config.threshold) if raw else loaded.recipe
    if threshold is not None:
        recipe = dataclasses.replace(recipe, threshold=resolve_threshold(loaded, threshold))
    if flip_tta is not None:
        recipe = dataclasses.replace(recipe, flip_tta=bool(flip_tta))
    return recipe


def prompt_boxes(dataset: BusiDataset) -> np.ndarray:
    """Box prompts (N, 4) from the dataset's masks at the training size (no jitter)."""
    return np.asarray(boxes_from_masks(jnp.asarray(dataset.masks, jnp.float32)))


def evaluate_dataset(loaded: LoadedModel, dataset: BusiDataset, native: bool = True,
                     threshold: float | None = None, flip_tta: bool | None = None, n_boot: int = 1000,
                     progress: Callable[[int, int], None] | None = None, raw: bool = False,
                     recipe: InferenceRecipe | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Aggregated metrics and per-image rows of ``loaded`` on ``dataset``.

    native=True compares at each image's original size with its original (union) mask;
    False at the training size with the resized mask. The checkpoint's inference recipe
    is applied (``raw=True``: the model output at the config's threshold; ``recipe``: this
    one instead); ``threshold`` / ``flip_tta`` override the recipe's.
    """
    recipe = recipe or effective_recipe(loaded, threshold, flip_tta, raw)
    if native and not dataset.original_masks:
        raise ValueError("native-resolution evaluation needs the original masks; read the data with keep_original=True")
    boxes = None
    if needs_box_prompts(loaded.model):
        # Prompted from the ground truth: only images with a lesion have a box to give.
        dataset = dataset.subset([i for i, m in zip(dataset.ids, dataset.masks) if m.any()])
        boxes = prompt_boxes(dataset)
    if boxes is None:
        probs, classes = predict_outputs(loaded, dataset.images_u8, recipe.flip_tta)
    else:
        if recipe.gate != "none":
            raise ValueError("a box-prompted model is prompted on lesion images only; its recipe cannot gate")
        probs = predict_probabilities(loaded, dataset.images_u8, loaded.config.eval_batch_size, recipe.flip_tta,
                                      boxes)
        classes = None
    rows = []
    for i, prob in enumerate(probs):
        gt = dataset.original_masks[i] if native else dataset.masks[i, :, :, 0] > 0
        pred = recipe_mask(prob, None if classes is None else classes[i], recipe, gt.shape)
        row = M.image_metrics(pred, gt)
        rows.append({"id": dataset.ids[i], "class": dataset.class_names[i], **row})
        if progress is not None:
            progress(i + 1, len(probs))
    return M.aggregate(rows, n_boot=n_boot, seed=loaded.config.seed), rows


def tune_inference(loaded: LoadedModel, dataset: BusiDataset, *, max_lesion_empty: float = 0.05,
                   tuned_on: str = "validation split",
                   progress: Callable[[int, int], None] | None = None) -> tuple[InferenceRecipe, dict[str, Any]]:
    """Choose the inference recipe of ``loaded`` on ``dataset`` (a validation split, read
    with its native masks when available): see unet_jax.inference.tune_recipe."""
    if needs_box_prompts(loaded.model):
        raise ValueError(f"{loaded.config.preset} is box-prompted: its masks come from ground-truth boxes, "
                         f"there is no recipe to tune")
    probs, classes = predict_outputs(loaded, dataset.images_u8, False)
    flipped = predict_probabilities(loaded, dataset.images_u8[:, :, ::-1], loaded.config.eval_batch_size)[:, :, ::-1]
    gts = list(dataset.original_masks) if dataset.original_masks else [m[..., 0] > 0 for m in dataset.masks]
    return tune_recipe(probs, np.ascontiguousarray(flipped), classes, gts, max_lesion_empty=max_lesion_empty,
                       tuned_on=tuned_on, progress=progress)


def evaluate_classification(loaded: LoadedModel, dataset: BusiDataset) -> dict[str, Any]:
    """Image classification metrics (unet_jax.metrics.classification_metrics) of a model
    with a class head on ``dataset``: accuracy, loss, per-class recall, malignant-vs-rest AUC."""
    probs = predict_class_probabilities(loaded, dataset.images_u8, loaded.config.eval_batch_size)
    return M.to_jsonable(M.classification_metrics(np.asarray(dataset.labels), probs))


def evaluation_report(aggregate: dict[str, Any], rows: list[dict[str, Any]], *, native: bool,
                      source: str) -> dict[str, Any]:
    """The JSON object of ``unet-jax evaluate --json``: for every metric its overall mean,
    per-class and lesion means and the full summaries; the normal false-positive rate."""
    report: dict[str, Any] = {"source": source, "resolution": "native" if native else "training",
                              "images": aggregate["counts"]}
    for metric in M.METRICS:
        groups = aggregate[metric]
        report[metric] = {"mean": groups["overall"]["mean"],
                          **{g: groups[g]["mean"] for g in groups if g != "overall"},
                          "summary": groups}
    report["normal_false_positive_rate"] = aggregate["normal_false_positive_rate"]["rate"]
    report["normal_false_positive"] = aggregate["normal_false_positive_rate"]
    report["lesion_empty_prediction_rate"] = aggregate["lesion_empty_prediction_rate"]["rate"]
    report["lesion_empty_prediction"] = aggregate["lesion_empty_prediction_rate"]
    report["per_image"] = rows
    return M.to_jsonable(report)


def read_for_evaluation(loaded: LoadedModel, data: str | Path,
                        progress: Callable[[int, int], None] | None = None) -> BusiDataset:
    """A BUSI-layout folder read the way the checkpoint's model was trained; a missing class
    folder is no problem here (e.g. lesion images only)."""
    if not Path(data).exists():
        raise ValueError(f"data folder {str(data)!r} does not exist; expected a folder in the BUSI layout")
    # Any subset of the classes is a valid test set (lesion images only, normal only).
    options = ReadOptions(size=loaded.input_size, channels=loaded.config.channels, keep_original=True,
                          all_classes=False)
    return load_busi(data, options, progress)
