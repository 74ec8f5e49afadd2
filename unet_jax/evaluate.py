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
from unet_jax.config import TrainConfig, config_from_dict
from unet_jax.data import BusiDataset, ReadOptions, load_busi
from unet_jax.models import needs_box_prompts

__all__ = ["LoadedModel", "load_checkpoint", "resolve_threshold", "predict_probabilities",
           "predict_class_probabilities", "evaluate_dataset", "evaluate_classification", "evaluation_report",
           "read_for_evaluation"]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model rebuilt from a checkpoint's saved config, with its variables."""

    model: Any
    variables: dict[str, Any]
    config: TrainConfig
    step_dir: Path

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.image_size, self.config.image_size


def load_checkpoint(path: str | Path, expect: dict[str, Any] | None = None) -> LoadedModel:
    """Load ``path`` (a run folder, ``checkpoints/best`` or a step folder).

    ``expect``: model fields the caller requires (e.g. ``{"preset": "padded"}``); a
    checkpoint of another architecture is a ``ValueError`` saying what differs.
    """
    from unet_jax.train.checkpoint import find_checkpoint, read_meta, restore_variables
    from unet_jax.train.loop import build_model

    step_dir = find_checkpoint(path)
    meta = read_meta(step_dir)
    if "config" not in meta:
        raise ValueError(f"checkpoint {str(step_dir)!r} has no saved config; expected one written by `unet-jax train`")
    config = config_from_dict(meta["config"], source=f"{step_dir}/meta")
    for key, value in (expect or {}).items():
        if getattr(config, key) != value:
            raise ValueError(f"checkpoint {str(step_dir)!r} holds {key}={getattr(config, key)!r}; expected {key}={value!r}")
    from unet_jax.train.state import init_variables

    model = build_model(config)
    shape = (1, config.image_size, config.image_size, config.channels)
    abstract = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), shape))
    variables = restore_variables(step_dir, abstract)
    return LoadedModel(model, variables, config, step_dir)


def resolve_threshold(loaded: LoadedModel, threshold: float | None) -> float:
    """``threshold``, or the checkpoint's own when None; a value outside (0, 1) is an error
    (at 0 or 1 every pixel, or none, would be predicted a lesion)."""
    t = loaded.config.threshold if threshold is None else threshold
    if not (isinstance(t, (int, float)) and 0 < t < 1):
        raise ValueError(f"threshold {t!r}: expected a probability in (0, 1), e.g. 0.5")
    return float(t)


def _outputs(model: Any, variables: dict[str, Any], x: jax.Array, boxes: jax.Array | None) -> Any:
    from unet_jax.train.steps import split_outputs

    extra = () if boxes is None else (boxes,)
    return split_outputs(model.apply(variables, x, *extra, train=False))


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


def _batched(loaded: LoadedModel, images_u8: np.ndarray, boxes: np.ndarray | None, batch_size: int,
             flip_tta: bool, which: int) -> np.ndarray:
    n = images_u8.shape[0]
    if needs_box_prompts(loaded.model) and boxes is None:
        raise ValueError(f"{loaded.config.preset} is box-prompted: expected boxes (N, 4) with the images")
    parts = []
    for start in range(0, n, batch_size):
        chunk = images_u8[start : start + batch_size]
        box_chunk = None if boxes is None else np.asarray(boxes[start : start + batch_size], np.float32)
        pad = batch_size - chunk.shape[0]
        if pad:  # every batch reuses one compiled program
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
            if box_chunk is not None:
                box_chunk = np.concatenate([box_chunk, np.repeat(box_chunk[:1], pad, axis=0)])
        out = _probabilities(loaded.model, loaded.variables, jnp.asarray(chunk),
                             None if box_chunk is None else jnp.asarray(box_chunk), flip_tta)[which]
        if out is None:
            head = "mask" if which == 0 else "class"
            raise ValueError(f"{loaded.config.preset} has no {head} head; expected a "
                             f"{'segmentation' if which == 0 else 'classification'} model")
        parts.append(np.asarray(out)[: batch_size - pad])
    return np.concatenate(parts) if parts else np.empty((0,), np.float32)


def predict_probabilities(loaded: LoadedModel, images_u8: np.ndarray, batch_size: int = 16,
                          flip_tta: bool = False, boxes: np.ndarray | None = None) -> np.ndarray:
    """Foreground probabilities (N, H, W) float32 for uint8 images (N, H, W, C) at the
    training size. Box-prompted models need ``boxes`` (N, 4) xyxy in those pixels."""
    return _batched(loaded, images_u8, boxes, batch_size, flip_tta, 0)


def predict_class_probabilities(loaded: LoadedModel, images_u8: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Class probabilities (N, K) (softmax; benign, malignant, normal) of a model with a class head."""
    return _batched(loaded, images_u8, None, batch_size, False, 1)


def prompt_boxes(dataset: BusiDataset) -> np.ndarray:
    """Box prompts (N, 4) from the dataset's masks at the training size (no jitter)."""
    from unet_jax.data.prompts import boxes_from_masks

    return np.asarray(boxes_from_masks(jnp.asarray(dataset.masks, jnp.float32)))


def evaluate_dataset(loaded: LoadedModel, dataset: BusiDataset, native: bool = True,
                     threshold: float | None = None, flip_tta: bool = False, n_boot: int = 1000,
                     progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Aggregated metrics and per-image rows of ``loaded`` on ``dataset``.

    native=True compares at each image's original size with its original (union) mask;
    False at the training size with the resized mask.
    """
    t = resolve_threshold(loaded, threshold)
    if native and not dataset.original_masks:
        raise ValueError("native-resolution evaluation needs the original masks; read the data with keep_original=True")
    boxes = None
    if needs_box_prompts(loaded.model):
        # Prompted from the ground truth: only images with a lesion have a box to give.
        dataset = dataset.subset([i for i, m in zip(dataset.ids, dataset.masks) if m.any()])
        boxes = prompt_boxes(dataset)
    probs = predict_probabilities(loaded, dataset.images_u8, loaded.config.eval_batch_size, flip_tta, boxes)
    rows = []
    for i, prob in enumerate(probs):
        if native:
            gt = dataset.original_masks[i]
            pred = M.resize_mask(prob, gt.shape, t=t)
        else:
            gt = dataset.masks[i, :, :, 0] > 0
            pred = M.threshold(prob, t)
        row = M.image_metrics(pred, gt)
        rows.append({"id": dataset.ids[i], "class": dataset.class_names[i], **row})
        if progress is not None:
            progress(i + 1, len(probs))
    return M.aggregate(rows, n_boot=n_boot, seed=loaded.config.seed), rows


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
    """A BUSI-layout folder read the way the checkpoint's model was trained."""
    if not Path(data).exists():
        raise ValueError(f"data folder {str(data)!r} does not exist; expected a folder in the BUSI layout")
    options = ReadOptions(size=loaded.input_size, channels=loaded.config.channels, keep_original=True)
    return load_busi(data, options, progress)
