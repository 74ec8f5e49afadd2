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

__all__ = ["LoadedModel", "load_checkpoint", "resolve_threshold", "predict_probabilities", "evaluate_dataset",
           "evaluation_report", "read_for_evaluation"]


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
    model = build_model(config)
    shape = (1, config.image_size, config.image_size, config.channels)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
    variables = restore_variables(step_dir, abstract)
    return LoadedModel(model, variables, config, step_dir)


def resolve_threshold(loaded: LoadedModel, threshold: float | None) -> float:
    """``threshold``, or the checkpoint's own when None; a value outside (0, 1) is an error
    (at 0 or 1 every pixel, or none, would be predicted a lesion)."""
    t = loaded.config.threshold if threshold is None else threshold
    if not (isinstance(t, (int, float)) and 0 < t < 1):
        raise ValueError(f"threshold {t!r}: expected a probability in (0, 1), e.g. 0.5")
    return float(t)


@functools.partial(jax.jit, static_argnames=("model", "flip"))
def _probabilities(model: Any, variables: dict[str, Any], images_u8: jax.Array, flip: bool) -> jax.Array:
    x = images_u8.astype(jnp.float32) / 255.0
    logits = model.apply(variables, x, train=False)
    prob = jax.nn.sigmoid(logits[..., 0])
    if flip:  # test-time augmentation: average with the mirrored image's prediction
        mirrored = model.apply(variables, x[:, :, ::-1], train=False)
        prob = 0.5 * (prob + jax.nn.sigmoid(mirrored[..., 0])[:, :, ::-1])
    return prob


def predict_probabilities(loaded: LoadedModel, images_u8: np.ndarray, batch_size: int = 16,
                          flip_tta: bool = False) -> np.ndarray:
    """Foreground probabilities (N, H, W) float32 for uint8 images (N, H, W, C) at the
    training size. The last batch is padded so every batch reuses one compiled program."""
    n = images_u8.shape[0]
    out = np.empty(images_u8.shape[:3], np.float32)
    for start in range(0, n, batch_size):
        chunk = images_u8[start : start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        prob = np.asarray(_probabilities(loaded.model, loaded.variables, jnp.asarray(chunk), flip_tta))
        out[start : start + batch_size] = prob[: batch_size - pad]
    return out


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
    probs = predict_probabilities(loaded, dataset.images_u8, loaded.config.eval_batch_size, flip_tta)
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
