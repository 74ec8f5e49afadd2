"""ResNet-18/34 (He, Zhang, Ren and Sun 2016) and a U-Net decoder on its features.

Written with :mod:`unet_jax.layers` (NHWC, ``(kh, kw, in, out)`` kernels), laid out as
torchvision's ``resnet18``/``resnet34`` and segmentation_models_pytorch's (smp)
``Unet(encoder_name="resnet34")`` so that their weights load unchanged
(:mod:`unet_jax.convert.resnet`)::

    input ─ conv1 7x7/2 ─ bn1 ─ ReLU ─┬─ maxpool 3x3/2 ─ layer1 ─┬─ layer2 ─┬─ layer3 ─┬─ layer4 ─┐
                                     f1 (stride 2)             f2 (4)     f3 (8)     f4 (16)    f5 (32)
    f5 ─ block0(up 2x, concat f4) ─ block1(f3) ─ block2(f2) ─ block3(f1) ─ block4(no skip) ─ head

Every convolution pads exactly as its PyTorch counterpart: explicit integer padding
(3x3: 1, stem 7x7: 3, max pool 3x3: 1 with ``-inf``), never ``'SAME'``, whose stride-2
padding is asymmetric (TensorFlow's) and would shift every feature map by one pixel.
Batch norm uses PyTorch's defaults (epsilon 1e-5, torch momentum 0.1 = Flax momentum 0.9).
All heads return **logits** (the project convention: sigmoid/softmax only in losses,
metrics and prediction).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unet_jax.layers import Conv2D, MaxPool2D
from unet_jax.models._presets import from_preset

__all__ = [
    "BasicBlock",
    "ResNetEncoder",
    "ResNetClassifier",
    "ResNetDecoderBlock",
    "ResNetUNet",
    "RESNET_STAGE_SIZES",
    "RESNET_PRESETS",
    "DEFAULT_WIDTHS",
    "create_resnet",
    "check_resnet_input_size",
]

Initializer = Callable[..., jax.Array]

# torchvision's ResNet: kaiming_normal_(mode="fan_out", nonlinearity="relu") (untruncated).
_encoder_conv_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# smp's initialize_decoder: kaiming_uniform_(mode="fan_in", nonlinearity="relu").
_decoder_conv_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
# smp's initialize_head: xavier_uniform_ weights, zero bias.
_head_init: Initializer = nn.initializers.xavier_uniform()
# torch.nn.Linear's default weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_linear_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

DEFAULT_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)


def _batch_norm(module: nn.Module, name: str, train: bool) -> Callable[[jax.Array], jax.Array]:
    """Batch norm ``name`` of ``module``, applied to ``(N, H, W, C)`` features; returns
    ``module.dtype`` (its input's dtype when None)."""
    norm = nn.BatchNorm(
        use_running_average=not train,
        momentum=module.bn_momentum,
        epsilon=module.bn_epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name=name,
    )
    # Flax subtracts the float32 statistics from its input as is, so bfloat16 features need
    # implicit promotion (refused under strict dtype promotion); casting them to float32 is
    # that promotion made explicit (the statistics are float32 reductions either way), and
    # the output is still cast to ``dtype``.
    return lambda x: norm(x.astype(jnp.float32))


def _check_image(label: str, x: jax.Array, channels: int) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(f"{label}: input must be (batch, height, width, {channels}), got shape {tuple(x.shape)}")


def _global_average_pool(x: jax.Array) -> jax.Array:
    """``(N, H, W, C) -> (N, C)``, averaged in float32 (a bfloat16 sum of 49+ values drifts)."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# --------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """The two-convolution residual block of He et al. (2016, Fig. 2 / Table 1).

    ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``: 3x3 convolutions (padding 1,
    the first with stride ``strides``), no bias (batch norm follows). The shortcut is the
    identity, or a 1x1 stride-``s`` convolution + batch norm ("option B") when the shape
    changes. Shapes: ``(N, H, W, C) -> (N, ceil(H / s), ceil(W / s), features)``.

    Submodules ``conv1, bn1, conv2, bn2, downsample_conv, downsample_bn`` are torchvision's
    ``conv1, bn1, conv2, bn2, downsample.0, downsample.1``.
    """

    features: int
    strides: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def _conv(self, features: int, kernel: int, strides: int, name: str) -> Conv2D:
        return Conv2D(
            features,
            kernel,
            strides=strides,
            padding=kernel // 2,  # PyTorch's symmetric padding: 1 for 3x3, 0 for 1x1
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_encoder_conv_init,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = self._conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(_batch_norm(self, "bn1", train)(y))
        y = self._conv(self.features, 3, 1, "conv2")(y)
        y = _batch_norm(self, "bn2", train)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = self._conv(self.features, 1, self.strides, "downsample_conv")(x)
            shortcut = _batch_norm(self, "downsample_bn", train)(shortcut)
        return nn.relu(y + shortcut.astype(y.dtype))


class ResNetEncoder(nn.Module):
    """ResNet-18/34 without its classifier: ``(N, H, W, in_channels) ->`` five feature maps.

    Returns ``(f1, f2, f3, f4, f5)`` at strides 2, 4, 8, 16, 32 (for ``H`` a multiple of 32):

    * ``f1``: stem ``conv1`` (7x7, stride 2, padding 3, no bias) + ``bn1`` + ReLU,
      ``widths[0]`` channels (the map before max pooling, smp's first skip);
    * ``f2 .. f5``: ``layer1 .. layer4`` after the 3x3 stride-2 max pool (padding 1,
      ``-inf``), with ``widths`` channels; ``layer1`` keeps the stride, the others halve it.

    In general ``1 + len(stage_sizes)`` maps. Block ``b`` of stage ``L`` is the submodule
    ``layer{L}_{b}`` (torchvision's ``layer{L}.{b}``).

    Attributes:
      stage_sizes: BasicBlocks per stage: ``(2, 2, 2, 2)`` ResNet-18, ``(3, 4, 6, 3)``
        ResNet-34 (He et al. 2016, Table 1).
      in_channels: input channels (3 RGB as ImageNet; 1 for grayscale ultrasound).
      widths: channels of each stage (the stem has ``widths[0]``).
      bn_momentum, bn_epsilon: Flax momentum (0.9 = torch's 0.1) and epsilon (torch 1e-5).
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision).
      param_dtype: parameter dtype.
    """

    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    in_channels: int = 3
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, ...]:
        _check_image("ResNetEncoder", x, self.in_channels)
        if len(self.stage_sizes) != len(self.widths) or min(self.stage_sizes, default=0) < 1:
            raise ValueError(
                f"ResNetEncoder: stage_sizes {tuple(self.stage_sizes)} and widths "
                f"{tuple(self.widths)} must have the same length, every stage >= 1 block"
            )
        x = Conv2D(
            self.widths[0],
            7,
            strides=2,
            padding=3,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_encoder_conv_init,
            name="conv1",
        )(x)
        x = nn.relu(_batch_norm(self, "bn1", train)(x))
        features = [x]
        x = MaxPool2D(3, strides=2, padding=1, name="maxpool")(x)
        for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths), start=1):
            for block in range(blocks):
                x = BasicBlock(
                    width,
                    strides=2 if stage > 1 and block == 0 else 1,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{stage}_{block}",
                )(x, train=train)
            features.append(x)
        return tuple(features)


def _encoder(module: nn.Module) -> ResNetEncoder:
    return ResNetEncoder(
        stage_sizes=tuple(module.stage_sizes),
        in_channels=module.in_channels,
        widths=tuple(module.widths),
        bn_momentum=module.bn_momentum,
        bn_epsilon=module.bn_epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        name="encoder",
    )


# --------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------
class ResNetClassifier(nn.Module):
    """ResNet classifier: ``(N, H, W, in_channels) -> (N, num_classes)`` float32 logits.

    torchvision's network: :class:`ResNetEncoder` (submodule ``encoder``), global average
    pooling of the stride-32 map, optional dropout, and a linear layer ``fc``.

    Attributes:
      stage_sizes, in_channels, widths, bn_momentum, bn_epsilon, dtype, param_dtype: as
        :class:`ResNetEncoder`.
      num_classes: logits (3 for BUSI's benign / malignant / normal).
      dropout_rate: dropout before ``fc`` (not in torchvision; 0 disables it). Needs a
        ``'dropout'`` rng when ``train=True`` and the rate is positive.
    """

    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    num_classes: int = 3
    in_channels: int = 3
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    dropout_rate: float = 0.0
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        _check_image("ResNetClassifier", x, self.in_channels)
        features = _encoder(self)(x, train=train)
        pooled = _global_average_pool(features[-1])
        if self.dropout_rate > 0.0:
            pooled = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(pooled)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_linear_init,
            name="fc",
        )(pooled)
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------
# U-Net on the ResNet encoder
# --------------------------------------------------------------------------------------
class ResNetDecoderBlock(nn.Module):
    """smp's ``DecoderBlock``: 2x nearest up-sampling, ``[up, skip]`` concat, 2 x conv-BN-ReLU.

    ``(N, H, W, C), (N, 2H, 2W, Cs) | None -> (N, 2H, 2W, features)``. The 3x3
    convolutions (padding 1) have no bias when batch norm follows (``use_batchnorm``) and
    a bias otherwise, as smp's ``Conv2dReLU``. Submodules ``conv1, bn1, conv2, bn2`` are
    smp's ``conv1.0, conv1.1, conv2.0, conv2.1``.
    """

    features: int
    use_batchnorm: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, skip: jax.Array | None = None, *, train: bool) -> jax.Array:
        # F.interpolate(scale_factor=2, mode="nearest"): out[i] = in[i // 2].
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if skip is not None:
            if skip.shape[1:3] != x.shape[1:3]:
                raise ValueError(
                    f"ResNetDecoderBlock {self.name!r}: skip {tuple(skip.shape)} does not match "
                    f"the up-sampled map {tuple(x.shape)} in height/width"
                )
            x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
        for i in (1, 2):
            x = Conv2D(
                self.features,
                3,
                padding=1,
                use_bias=not self.use_batchnorm,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=_decoder_conv_init,
                name=f"conv{i}",
            )(x)
            if self.use_batchnorm:
                x = _batch_norm(self, f"bn{i}", train)(x)
            x = nn.relu(x)
        return x


class ResNetUNet(nn.Module):
    """U-Net with a ResNet encoder: ``(N, H, W, in_channels) -> (N, H, W, num_classes)`` logits.

    The network of segmentation_models_pytorch's ``Unet(encoder_name="resnet34")`` (the
    U-Net of Ronneberger et al. 2015 with the ResNet of He et al. 2016 as its contracting
    path): :class:`ResNetEncoder` (``encoder``) gives maps at strides 2..32; the centre is
    the identity; decoder block ``i`` (``decoder_block{i}``, smp's ``decoder.blocks.{i}``,
    :class:`ResNetDecoderBlock`) up-samples 2x and concatenates the skip at strides 16, 8,
    4, 2 (the last block has none) before two conv-BN-ReLU; ``segmentation_head`` is a 3x3
    convolution (padding 1, with bias, no activation) to ``num_classes`` logits.

    ``H`` and ``W`` must be multiples of ``2 ** (len(stage_sizes) + 1)`` (32), otherwise a
    ``ValueError`` names the axis, the value and the nearest valid sizes
    (:func:`check_resnet_input_size`).

    With ``class_head > 0`` a classification head (global average pool of the stride-32
    map + ``Dense(class_head)`` named ``class_head``, smp's ``aux_params`` head without
    dropout) is added and the model returns ``{"mask": (N, H, W, num_classes), "class":
    (N, class_head)}``; otherwise the mask logits alone. Both are float32.

    Attributes:
      stage_sizes, in_channels, widths, bn_momentum, bn_epsilon, dtype, param_dtype: as
        :class:`ResNetEncoder` (``in_channels`` defaults to 1: grayscale ultrasound).
      decoder_channels: output channels of the decoder blocks, one per encoder map.
      num_classes: mask logits per pixel (1 for binary segmentation).
      class_head: image-level classes of the optional classification head (0: none).
      decoder_use_batchnorm: batch norm in the decoder (smp's ``decoder_use_batchnorm``).
    """

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    num_classes: int = 1
    in_channels: int = 1
    class_head: int = 0
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    decoder_use_batchnorm: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def output_stride(self) -> int:
        return 2 ** (len(self.stage_sizes) + 1)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array | dict[str, jax.Array]:
        _check_image("ResNetUNet", x, self.in_channels)
        if len(self.decoder_channels) != len(self.stage_sizes) + 1:
            raise ValueError(
                f"ResNetUNet: decoder_channels {tuple(self.decoder_channels)} must have one "
                f"entry per encoder map, {len(self.stage_sizes) + 1}"
            )
        check_resnet_input_size(x.shape[1:3], self.output_stride)

        features = _encoder(self)(x, train=train)
        y, skips = features[-1], features[-2::-1]  # head at stride 32; skips 16, 8, 4, 2
        for i, channels in enumerate(self.decoder_channels):
            y = ResNetDecoderBlock(
                channels,
                use_batchnorm=self.decoder_use_batchnorm,
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
            self.class_head,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_head_init,
            name="class_head",
        )(_global_average_pool(features[-1]))
        return {"mask": mask, "class": logits.astype(jnp.float32)}


def check_resnet_input_size(hw: Sequence[int], multiple: int = 32) -> tuple[int, int]:
    """Validate an input ``(height, width)`` for :class:`ResNetUNet`; returns it unchanged.

    Each must be a positive multiple of the encoder's output stride ``multiple`` (32 for
    five stride-2 steps), so that every up-sampled map lines up with its skip. Raises
    ``ValueError`` naming the axis, e.g. ``input height 100 is not a multiple of 32 ...;
    nearest valid sizes: 96 or 128``.
    """
    for axis, n in zip(("height", "width"), hw):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"input {axis} must be a positive integer, got {n!r}; smallest valid size: {multiple}")
        if n % multiple:
            below, above = (n // multiple) * multiple, (n // multiple + 1) * multiple
            nearest = " or ".join(str(m) for m in (below, above) if m > 0)
            raise ValueError(
                f"input {axis} {n} is not a multiple of {multiple} (the ResNet encoder's output "
                f"stride); nearest valid sizes: {nearest}"
            )
    return int(hw[0]), int(hw[1])


# --------------------------------------------------------------------------------------
# Presets: keyword sets for the definitions above
# --------------------------------------------------------------------------------------
RESNET_STAGE_SIZES: dict[str, tuple[int, ...]] = {
    "resnet18": (2, 2, 2, 2),  # He et al. 2016, Table 1
    "resnet34": (3, 4, 6, 3),
}

_PRESET_KINDS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # smp Unet(encoder_name=..., classes=1) for grayscale BUSI masks.
    "unet": (ResNetUNet, dict(decoder_channels=(256, 128, 64, 32, 16), num_classes=1, in_channels=1)),
    # torchvision's classifier with BUSI's three classes (benign, malignant, normal).
    "classifier": (ResNetClassifier, dict(num_classes=3, in_channels=3)),
}

RESNET_PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    f"{arch}_{kind}": (cls, dict(stage_sizes=sizes, **defaults))
    for arch, sizes in RESNET_STAGE_SIZES.items()
    for kind, (cls, defaults) in _PRESET_KINDS.items()
}


def create_resnet(name: str, **overrides: Any) -> nn.Module:
    """A model from :data:`RESNET_PRESETS` (e.g. ``"resnet34_unet"``) with field overrides."""
    return from_preset("ResNet", RESNET_PRESETS, name, overrides)
