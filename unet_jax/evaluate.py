"""Scores of a trained model on any folder in the BUSI layout.

The model sees each image at its training size (unet_jax.inference.run); the predicted
probabilities are resized back to the image's native size (bilinear, then thresholded) and
compared with the native ground truth, unless ``native=False`` asks for the training
resolution. Per-image metrics and their aggregation (per class, over lesion images, with
bootstrap confidence intervals, and the empty-mask conventions) come from
:mod:`unet_jax.metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax import metrics as M
from unet_jax.data import BusiDataset, ReadOptions, load_busi
from unet_jax.inference import (
    InferenceRecipe,
    LoadedModel,
    effective_recipe,
    predict_class_probabilities,
    predict_outputs,
    predict_probabilities,
    prompt_boxes,
    recipe_mask,
)
from unet_jax.models import needs_box_prompts

__all__ = ["evaluate_dataset", "evaluate_classification", "evaluation_report", "read_for_evaluation"]


def evaluate_dataset(
    loaded: LoadedModel,
    dataset: BusiDataset,
    native: bool = True,
    threshold: float | None = None,
    flip_tta: bool | None = None,
    n_boot: int = 1000,
    progress: Callable[[int, int], None] | None = None,
    raw: bool = False,
    recipe: InferenceRecipe | None = None,
    on_case: Callable[[dict[str, Any], np.ndarray, np.ndarray], None] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Aggregated metrics and per-image rows of ``loaded`` on ``dataset``.

    native=True compares at each image's original size with its original (union) mask;
    False at the training size with the resized mask. The checkpoint's inference recipe
    is applied (``raw=True``: the model output at the config's threshold; ``recipe``: this
    one instead); ``threshold`` / ``flip_tta`` override the recipe's. ``on_case(row, pred,
    gt)`` is called for each image with its row and its bool prediction and ground truth
    (one shape), e.g. to draw a report's overlay without keeping every mask.
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
        probs = predict_probabilities(loaded, dataset.images_u8, loaded.config.eval_batch_size, recipe.flip_tta, boxes)
        classes = None
    rows = []
    for i, prob in enumerate(probs):
        gt = dataset.original_masks[i] if native else dataset.masks[i, :, :, 0] > 0
        pred = recipe_mask(prob, None if classes is None else classes[i], recipe, gt.shape)
        row = M.image_metrics(pred, gt)
        rows.append({"id": dataset.ids[i], "class": dataset.class_names[i], **row})
        if on_case is not None:
            on_case(rows[-1], pred, gt)
        if progress is not None:
            progress(i + 1, len(probs))
    return M.aggregate(rows, n_boot=n_boot, seed=loaded.config.seed), rows


def evaluate_classification(loaded: LoadedModel, dataset: BusiDataset) -> dict[str, Any]:
    """Image classification metrics (unet_jax.metrics.classification_metrics) of a model
    with a class head on ``dataset``: accuracy, loss, per-class recall, malignant-vs-rest AUC."""
    probs = predict_class_probabilities(loaded, dataset.images_u8, loaded.config.eval_batch_size)
    return M.to_jsonable(M.classification_metrics(np.asarray(dataset.labels), probs))


def evaluation_report(
    aggregate: dict[str, Any], rows: list[dict[str, Any]], *, native: bool, source: str
) -> dict[str, Any]:
    """The JSON object of ``unet-jax evaluate --json``: for every metric its overall mean,
    per-class and lesion means and the full summaries; the normal false-positive rate."""
    report: dict[str, Any] = {
        "source": source,
        "resolution": "native" if native else "training",
        "images": aggregate["counts"],
    }
    for metric in M.METRICS:
        groups = aggregate[metric]
        report[metric] = {
            "mean": groups["overall"]["mean"],
            **{g: groups[g]["mean"] for g in groups if g != "overall"},
            "summary": groups,
        }
    report["normal_false_positive_rate"] = aggregate["normal_false_positive_rate"]["rate"]
    report["normal_false_positive"] = aggregate["normal_false_positive_rate"]
    report["lesion_empty_prediction_rate"] = aggregate["lesion_empty_prediction_rate"]["rate"]
    report["lesion_empty_prediction"] = aggregate["lesion_empty_prediction_rate"]
    report["per_image"] = rows
    return M.to_jsonable(report)


def read_for_evaluation(
    loaded: LoadedModel, data: str | Path, progress: Callable[[int, int], None] | None = None
) -> BusiDataset:
    """A BUSI-layout folder read the way the checkpoint's model was trained; a missing class
    folder is no problem here (e.g. lesion images only)."""
    if not Path(data).exists():
        raise ValueError(f"data folder {str(data)!r} does not exist; expected a folder in the BUSI layout")
    # Any subset of the classes is a valid test set (lesion images only, normal only).
    options = ReadOptions(
        size=loaded.input_size, channels=loaded.config.channels, keep_original=True, all_classes=False
    )
    return load_busi(data, options, progress)
