"""Model definitions: the U-Net family and its named presets."""

from unet_jax.models.unet import (
    DEFAULT_PRESET,
    PRESET_SIZES,
    PRESETS,
    ConvBlock,
    CropConcat,
    UNet,
    check_input_size,
    create_unet,
    nearest_valid_sizes,
    unet_output_size,
)

__all__ = [
    "DEFAULT_PRESET",
    "PRESET_SIZES",
    "PRESETS",
    "ConvBlock",
    "CropConcat",
    "UNet",
    "check_input_size",
    "create_unet",
    "nearest_valid_sizes",
    "unet_output_size",
]
