"""Segment Anything (Kirillov et al. 2023, "Segment Anything", ICCV) in Flax linen, NHWC.

A faithful port of the reference PyTorch package ``segment_anything`` (image encoder,
prompt encoder, mask decoder), its presets and a training-loop-facing
:class:`SamSegmenter`; LiteMedSAM's TinyViT encoder (:mod:`unet_jax.models.sam.tiny_vit`,
preset ``litemedsam``) and official preprocessing (:mod:`unet_jax.models.sam.litemedsam`).
The official checkpoints (SAM's and LiteMedSAM's released weights) are read by
:mod:`unet_jax.convert.sam` and :mod:`unet_jax.convert.litemedsam`.
"""

from unet_jax.models.sam.image_encoder import ImageEncoderViT
from unet_jax.models.sam.mask_decoder import MaskDecoder, TwoWayTransformer
from unet_jax.models.sam.prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from unet_jax.models.sam.sam import (
    SAM_PRESETS,
    Sam,
    SamSegmenter,
    create_sam,
    postprocess_masks,
    resize_bilinear,
    sam_init_params,
    sam_init_variables,
)
from unet_jax.models.sam.tiny_vit import TinyViT

__all__ = [
    "SAM_PRESETS",
    "ImageEncoderViT",
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptEncoder",
    "Sam",
    "SamSegmenter",
    "TinyViT",
    "TwoWayTransformer",
    "create_sam",
    "postprocess_masks",
    "resize_bilinear",
    "sam_init_params",
    "sam_init_variables",
]
