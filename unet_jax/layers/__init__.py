"""The layer math a student reads: :class:`Conv2D`, :class:`MaxPool2D`,
:class:`ConvTranspose2D` and the report's output-size formulas (:mod:`.layers`); the
convolution lowerings, pure functions of arrays (:mod:`.lowering`); the convolution's
gradients as canonical convolutions (:mod:`.conv_grad`); and the literal sums the tests
check the layers against (:mod:`.reference`). Nothing here imports a model.
"""

from unet_jax.layers.layers import (
    LAYOUTS,
    Conv2D,
    ConvTranspose2D,
    MaxPool2D,
    Padding,
    conv_output_size,
    conv_transpose_output_size,
    he_normal,
    pool_output_size,
    resolve_padding,
    resolve_transpose_padding,
    subpixel_conv_transpose,
    tiled_max_pool,
)

__all__ = [
    "Padding",
    "Conv2D",
    "MaxPool2D",
    "ConvTranspose2D",
    "conv_output_size",
    "pool_output_size",
    "conv_transpose_output_size",
    "subpixel_conv_transpose",
    "tiled_max_pool",
    "resolve_padding",
    "resolve_transpose_padding",
    "he_normal",
    "LAYOUTS",
]
