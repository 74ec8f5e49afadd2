"""The one batched, jitted prediction path: a LoadedModel's mask probabilities and class
probabilities for uint8 images at its training size, in fixed-size batches (one compiled
program), averaged over an ensemble's members, with optional flip test-time augmentation;
the box prompts of a box-prompted model; and the recipe tuned on a dataset's predictions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.data import BusiDataset
from unet_jax.data.prompts import boxes_from_masks
from unet_jax.inference.model import LoadedModel
from unet_jax.inference.recipe import InferenceRecipe, tune_recipe
from unet_jax.models import needs_box_prompts, run_model

__all__ = [
    "network_probabilities",
    "predict_probabilities",
    "predict_class_probabilities",
    "predict_outputs",
    "prompt_boxes",
    "tune_inference",
]


def _outputs(model: Any, variables: dict[str, Any], x: jax.Array, boxes: jax.Array | None) -> Any:
    return run_model(model.apply, variables, x, boxes)[0]


@functools.partial(jax.jit, static_argnames=("model", "flip"))
def _probabilities(
    model: Any, variables: dict[str, Any], images_u8: jax.Array, boxes: jax.Array | None, flip: bool
) -> tuple[jax.Array | None, jax.Array | None]:
    return network_probabilities(model, variables, images_u8.astype(jnp.float32) / 255.0, boxes, flip)


def network_probabilities(
    model: Any, variables: dict[str, Any], x: jax.Array, boxes: jax.Array | None, flip: bool
) -> tuple[jax.Array | None, jax.Array | None]:
    """One member's ``(mask probabilities (N, H, W) or None, class probabilities (N, K) or
    None)`` of float images ``x`` (N, H, W, C) in [0, 1], the mask flip-averaged when
    ``flip``: the network the batched path jits, and what ONNX export traces."""
    mask_logits, class_logits = _outputs(model, variables, x, boxes)
    # lax.index_in_dim, not [..., 0], and jnp.flip, not [:, :, ::-1]: with a symbolic batch
    # size (ONNX export) those indexings trace as gathers; these are slices and reversals.
    first = functools.partial(jax.lax.index_in_dim, index=0, axis=-1, keepdims=False)
    prob = None if mask_logits is None else jax.nn.sigmoid(first(mask_logits))
    if flip and prob is not None:  # test-time augmentation: average with the mirrored image's prediction
        width = x.shape[2]
        mirrored_boxes = (
            None
            if boxes is None
            else jnp.stack([width - 1 - boxes[:, 2], boxes[:, 1], width - 1 - boxes[:, 0], boxes[:, 3]], axis=-1)
        )
        mirrored, _ = _outputs(model, variables, jnp.flip(x, axis=2), mirrored_boxes)
        prob = 0.5 * (prob + jnp.flip(jax.nn.sigmoid(first(mirrored)), axis=2))
    return prob, (None if class_logits is None else jax.nn.softmax(class_logits, axis=-1))


def _member_outputs(
    loaded: LoadedModel, chunk: np.ndarray, box_chunk: np.ndarray | None, flip_tta: bool
) -> tuple[Any, Any]:
    """Both heads' probabilities for one batch, averaged over the ensemble's members."""
    prob_sum, class_sum = None, None
    for variables in loaded.all_variables:
        prob, cls = _probabilities(
            loaded.model, variables, jnp.asarray(chunk), None if box_chunk is None else jnp.asarray(box_chunk), flip_tta
        )
        prob_sum = prob if prob_sum is None else prob_sum + prob
        class_sum = cls if class_sum is None else class_sum + cls
    k = len(loaded.all_variables)
    return (None if prob_sum is None else prob_sum / k), (None if class_sum is None else class_sum / k)


def _batched_heads(
    loaded: LoadedModel, images_u8: np.ndarray, boxes: np.ndarray | None, batch_size: int, flip_tta: bool
) -> tuple[np.ndarray | None, np.ndarray | None]:
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


def _batched(
    loaded: LoadedModel, images_u8: np.ndarray, boxes: np.ndarray | None, batch_size: int, flip_tta: bool, which: int
) -> np.ndarray:
    out = _batched_heads(loaded, images_u8, boxes, batch_size, flip_tta)[which]
    if out is None:
        head = "mask" if which == 0 else "class"
        raise ValueError(
            f"{loaded.config.preset} has no {head} head; expected a "
            f"{'segmentation' if which == 0 else 'classification'} model"
        )
    return out


def predict_probabilities(
    loaded: LoadedModel,
    images_u8: np.ndarray,
    batch_size: int = 16,
    flip_tta: bool = False,
    boxes: np.ndarray | None = None,
) -> np.ndarray:
    """Foreground probabilities (N, H, W) float32 for uint8 images (N, H, W, C) at the
    training size. Box-prompted models need ``boxes`` (N, 4) xyxy in those pixels."""
    return _batched(loaded, images_u8, boxes, batch_size, flip_tta, 0)


def predict_class_probabilities(loaded: LoadedModel, images_u8: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Class probabilities (N, K) (softmax; benign, malignant, normal) of a model with a class head."""
    return _batched(loaded, images_u8, None, batch_size, False, 1)


def predict_outputs(
    loaded: LoadedModel, images_u8: np.ndarray, flip_tta: bool = False, batch_size: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``(mask probabilities (N, H, W), class probabilities (N, K) or None)`` of an
    unprompted segmenter (its ensemble members averaged)."""
    probs, classes = _batched_heads(loaded, images_u8, None, batch_size or loaded.config.eval_batch_size, flip_tta)
    if probs is None:
        raise ValueError(f"{loaded.config.preset} has no mask head; expected a segmentation model")
    return probs, classes


def prompt_boxes(dataset: BusiDataset) -> np.ndarray:
    """Box prompts (N, 4) from the dataset's masks at the training size (no jitter)."""
    return np.asarray(boxes_from_masks(jnp.asarray(dataset.masks, jnp.float32)))


def tune_inference(
    loaded: LoadedModel,
    dataset: BusiDataset,
    *,
    max_lesion_empty: float = 0.05,
    tuned_on: str = "validation split",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[InferenceRecipe, dict[str, Any]]:
    """Choose the inference recipe of ``loaded`` on ``dataset`` (a validation split, read
    with its native masks when available): see unet_jax.inference.recipe.tune_recipe."""
    if needs_box_prompts(loaded.model):
        raise ValueError(
            f"{loaded.config.preset} is box-prompted: its masks come from ground-truth boxes, "
            f"there is no recipe to tune"
        )
    probs, classes = predict_outputs(loaded, dataset.images_u8, False)
    flipped = predict_probabilities(loaded, dataset.images_u8[:, :, ::-1], loaded.config.eval_batch_size)[:, :, ::-1]
    gts = list(dataset.original_masks) if dataset.original_masks else [m[..., 0] > 0 for m in dataset.masks]
    return tune_recipe(
        probs,
        np.ascontiguousarray(flipped),
        classes,
        gts,
        max_lesion_empty=max_lesion_empty,
        tuned_on=tuned_on,
        progress=progress,
    )
