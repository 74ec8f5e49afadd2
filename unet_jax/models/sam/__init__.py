"""Segment Anything (Kirillov et al. 2023, "Segment Anything", ICCV) in Flax linen, NHWC.

A faithful port of the reference PyTorch package ``segment_anything`` (image encoder,
prompt encoder, mask decoder), its presets, a training-loop-facing
:class:`SamSegmenter`, and conversion of the official checkpoints; LiteMedSAM's TinyViT
encoder (:mod:`unet_jax.models.sam.tiny_vit`, preset ``litemedsam``), its released
weights and official preprocessing (:mod:`unet_jax.models.sam.litemedsam`).
"""

from unet_jax.models.sam.convert import (
    SamCheckpointError,
    convert_sam_checkpoint,
    infer_sam_preset,
    load_sam_params,
    read_sam_checkpoint,
    sam_params_from_state_dict,
    sam_variables_from_state_dict,
)
from unet_jax.models.sam.image_encoder import ImageEncoderViT
from unet_jax.models.sam.litemedsam import (
    find_litemedsam_checkpoint,
    load_litemedsam,
    read_litemedsam_checkpoint,
)
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
    "SamCheckpointError",
    "SamSegmenter",
    "TinyViT",
    "TwoWayTransformer",
    "convert_sam_checkpoint",
    "create_sam",
    "find_litemedsam_checkpoint",
    "load_litemedsam",
    "read_litemedsam_checkpoint",
    "infer_sam_preset",
    "load_sam_params",
    "postprocess_masks",
    "read_sam_checkpoint",
    "resize_bilinear",
    "sam_init_params",
    "sam_init_variables",
    "sam_params_from_state_dict",
    "sam_variables_from_state_dict",
]
