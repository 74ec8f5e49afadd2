"""unet_jax: a from-scratch U-Net toolkit in JAX/Flax for breast-ultrasound segmentation."""

from unet_jax.layers import (
    Conv2D,
    ConvTranspose2D,
    MaxPool2D,
    conv_output_size,
    conv_transpose_output_size,
    pool_output_size,
)
from unet_jax.models import DEFAULT_PRESET, PRESETS, UNet, create_model, create_unet, model_names

__version__ = "0.1.0"

__all__ = [
    "Conv2D",
    "ConvTranspose2D",
    "MaxPool2D",
    "conv_output_size",
    "conv_transpose_output_size",
    "pool_output_size",
    "DEFAULT_PRESET",
    "PRESETS",
    "UNet",
    "create_unet",
    "create_model",
    "model_names",
    "__version__",
]
