"""The U-Net family (Ronneberger, Fischer and Brox 2015) built from :mod:`unet_jax.layers`.

One configurable :class:`UNet`; the named presets in :data:`PRESETS` are keyword sets for
it, so every variant shares one definition::

    input ─ enc1 ─ pool1 ─ enc2 ─ ... ─ pool{d} ─ bottleneck ─ up{d} ─ concat{d} ─ dec{d} ─ ... ─ dec1 ─ head
              └──────────── skip (centre-cropped in VALID mode) ────────────┘

Each block is ``convs_per_block`` x (convolution, optional batch norm, ReLU). Features
double at every level: ``features * 2**level``; the bottleneck has ``features * 2**depth``.
Every up-convolution halves the channels back before concatenation with its skip. The
head is a 1x1 convolution producing **logits** (the project convention: sigmoid/softmax
only in losses, metrics and prediction).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unet_jax.layers import (
    Conv2D,
    ConvTranspose2D,
    MaxPool2D,
    conv_output_size,
    conv_transpose_output_size,
    pool_output_size,
)
from unet_jax.layers.dropout import Dropout8
from unet_jax.models._presets import from_preset

__all__ = [
    "UNet",
    "ConvBlock",
    "CropConcat",
    "PRESETS",
    "DEFAULT_PRESET",
    "PRESET_SIZES",
    "create_unet",
    "unet_output_size",
    "check_input_size",
    "nearest_valid_sizes",
    "fold_batch_norm",
]


class ConvBlock(nn.Module):
    """``num_convs`` x (Conv2D k x k, optional BatchNorm, ReLU): ``(N, H, W, C) -> (N, H', W', features)``.

    ``H' = H`` in ``SAME`` mode and ``H - num_convs * (k - 1)`` in ``VALID`` mode. With
    ``layout='NCHW'`` the block reads and writes ``(N, C, H, W)``.
    """

    features: int
    num_convs: int = 2
    kernel_size: int = 3
    padding: Literal["SAME", "VALID"] = "SAME"
    norm: Literal["batch", "none"] = "batch"
    use_bias: bool = True
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: Any = None
    param_dtype: Any = jnp.float32
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    gradient: Literal["auto", "xla", "explicit"] = "auto"
    lowering: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        # 'auto' picks from the tuned table's forward + backward entries when training.
        lowering = "auto-train" if self.lowering == "auto" and train else self.lowering
        for i in range(1, self.num_convs + 1):
            x = Conv2D(
                self.features,
                self.kernel_size,
                padding=self.padding,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                layout=self.layout,
                gradient=self.gradient,
                lowering=lowering,
                name=f"conv{i}",
            )(x)
            if self.norm == "batch":
                # Flax's BatchNorm mixes bfloat16 features with float32 statistics inside;
                # standard promotion there keeps the project's own code under strict checks.
                with jax.numpy_dtype_promotion("standard"):
                    x = nn.BatchNorm(
                        use_running_average=not train,
                        axis=-1 if self.layout == "NHWC" else 1,
                        momentum=self.bn_momentum,
                        epsilon=self.bn_epsilon,
                        dtype=self.dtype,
                        param_dtype=self.param_dtype,
                        name=f"bn{i}",
                    )(x)
            x = nn.relu(x)
        return x


class CropConcat(nn.Module):
    """Centre-crop the skip connection to the up-sampled map, then concatenate channels.

    ``(N, Hs, Ws, Cs), (N, H, W, C) -> (N, H, W, Cs + C)`` with ``Hs >= H``; the crop is
    the one of Ronneberger et al. (2015, Fig. 1, grey arrows) and a no-op in SAME mode.
    Channel order is ``[up, skip]``, as the notebook's ``concatenate([u, c])``. With
    ``layout='NCHW'`` both maps are ``(N, C, H, W)``.
    """

    layout: Literal["NHWC", "NCHW"] = "NHWC"

    @nn.compact
    def __call__(self, skip: jax.Array, up: jax.Array) -> jax.Array:
        h_axis = 1 if self.layout == "NHWC" else 2
        dh, dw = skip.shape[h_axis] - up.shape[h_axis], skip.shape[h_axis + 1] - up.shape[h_axis + 1]
        if dh < 0 or dw < 0:
            label = f"CropConcat {self.name!r}" if self.name else "CropConcat"  # not "None"
            raise ValueError(
                f"{label}: skip {tuple(skip.shape)} is smaller than the up-sampled map "
                f"{tuple(up.shape)}; expected skip height/width >= up's"
            )
        top, left = dh // 2, dw // 2
        skip = jax.lax.slice_in_dim(skip, top, top + up.shape[h_axis], axis=h_axis)
        skip = jax.lax.slice_in_dim(skip, left, left + up.shape[h_axis + 1], axis=h_axis + 1)
        return jnp.concatenate([up, skip.astype(up.dtype)], axis=-1 if self.layout == "NHWC" else 1)


class UNet(nn.Module):
    """U-Net: ``(N, H, W, in_channels) -> (N, H_out, W_out, num_classes)`` logits.

    ``H_out = H`` in SAME mode; in VALID mode :func:`unet_output_size` (572 -> 388 for the
    original network). Input sizes that do not pass every pooling step evenly are refused
    with a ``ValueError`` naming the nearest valid sizes (:func:`check_input_size`).

    Attributes:
      features: channels of the first level (doubling at each of the ``depth`` levels).
      depth: number of 2x2 max-pooling steps (and of up-convolutions).
      convs_per_block: convolutions in every encoder/decoder/bottleneck block.
      kernel_size: of those convolutions.
      padding: ``'SAME'`` (output size = input size) or ``'VALID'`` (unpadded, as 2015).
      norm: ``'batch'`` (BatchNorm after every convolution) or ``'none'``.
      dropout_rate: dropout after every pooling and every concatenation (the notebook's
        placement); 0 disables it.
      up_kernel: kernel of the stride-2 up-convolutions (2 as in 2015, 3 in the notebook).
      in_channels: input channels (1 grayscale, 3 RGB).
      num_classes: output channels (1 logit for binary segmentation).
      use_bias: bias in the block convolutions (redundant before batch norm).
      bn_momentum, bn_epsilon: batch-norm running-average momentum and epsilon.
      dtype: computation dtype (``jnp.bfloat16`` for mixed precision); logits are float32.
      param_dtype: parameter dtype.
      up_method: how the up-convolutions compute (``ConvTranspose2D.method``):
        ``'auto'`` (per backend: ``unet_jax.layers.layers.AUTO_TRANSPOSE_METHOD``),
        ``'zero_insertion'``, ``'interleave'``, ``'matmul'`` (``up_kernel`` 2 only),
        ``'subpixel'`` or ``'custom_vjp'``; the same parameters and outputs.
      class_head: if > 0, also classify the image from the bottleneck (global average
        pooling + a dense layer named ``class_head``); the model then returns
        ``{"mask": (N, H_out, W_out, num_classes), "class": (N, class_head)}`` logits.
      layout: the logical layout of the activations inside the network, ``'NHWC'`` or
        ``'NCHW'`` (transposed once on the way in and once on the way out; input, output
        and parameters are the same in both): a performance lever, not a semantic one.
      gradient: how every convolution is differentiated (``Conv2D.gradient``): ``'auto'``
        (written-out canonical gradients on the CPU backend, which XLA:CPU needs inside a
        scanned step), ``'xla'`` (JAX's autodiff; forward mode too) or ``'explicit'``.
      lowering: how the block convolutions compute (``Conv2D.lowering``: ``'lax'``,
        ``'direct'``, ``'stem'``, ``'im2col'``, ``'winograd2'``, ``'winograd4'``, ``'auto'``); the same
        parameters.
        ``'auto'`` reads the machine's tuned table (:mod:`unet_jax.layers.lowering`), its
        forward + backward entries when ``train=True``. The 1x1 head stays on ``'lax'``.
      dropout_bits: random bits per dropped-out element: 32 (``flax.linen.Dropout``) or 8
        (``unet_jax.layers.dropout.Dropout8``: one 32-bit draw per four elements, the rate
        rounded to 1/256; issue 31). A speed lever; other masks than 32's.
      deep_supervision: auxiliary 1x1 heads (``aux_head2``, ...) on the outputs of decoder
        levels 2 .. deep_supervision + 1 (1/2, 1/4, ... of the output size; nnU-Net's deep
        supervision, Isensee et al. 2021). With ``train=True`` their logits come out as
        ``{"mask", "aux": (level 2, level 3, ...), ["class"]}``; at inference they are
        computed for nothing (and dropped by XLA), so the parameters are the same in both
        modes. 0 disables them.
    """

    features: int = 64
    depth: int = 4
    convs_per_block: int = 2
    kernel_size: int = 3
    padding: Literal["SAME", "VALID"] = "SAME"
    norm: Literal["batch", "none"] = "batch"
    dropout_rate: float = 0.0
    up_kernel: int = 2
    in_channels: int = 1
    num_classes: int = 1
    use_bias: bool = True
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: Any = None
    param_dtype: Any = jnp.float32
    class_head: int = 0
    up_method: Literal["auto", "zero_insertion", "interleave", "matmul", "subpixel", "custom_vjp", "onednn"] = "auto"
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    gradient: Literal["auto", "xla", "explicit"] = "auto"
    lowering: str = "lax"
    deep_supervision: int = 0
    dropout_bits: Literal[32, 8] = 32

    @staticmethod
    def check_fields(values: dict[str, Any]) -> None:
        """The U-Net's own constraints between fields (the shared rules are in
        ``models._presets.FIELD_RULES``): a 'SAME' convolution needs an odd kernel; deep
        supervision needs that many decoder levels below the top one."""
        aux = values.get("deep_supervision", 0)
        if not isinstance(aux, int) or isinstance(aux, bool) or not 0 <= aux < values.get("depth", 4):
            raise ValueError(
                f"model.deep_supervision = {aux!r}: expected an integer from 0 to depth - 1 = "
                f"{values.get('depth', 4) - 1} (auxiliary heads on the decoder levels below the top) (UNet)"
            )
        if aux and values.get("padding") == "VALID":
            raise ValueError(
                "model.deep_supervision with padding 'VALID': the decoder levels' sizes are not the "
                "output size halved; expected padding 'SAME' (or deep_supervision=0) (UNet)"
            )
        if values.get("up_method") == "matmul" and values.get("up_kernel", 2) != 2:
            raise ValueError(
                f"model.up_method = 'matmul' with up_kernel {values['up_kernel']}: a per-pixel matrix "
                "product needs the kernel to equal the stride (2); expected up_kernel=2 or another "
                "up_method (UNet)"
            )
        if values.get("padding") == "SAME" and values.get("kernel_size", 3) % 2 == 0:
            raise ValueError(
                f"model.kernel_size = {values['kernel_size']}: expected an odd size with "
                f"padding 'SAME' (an even kernel cannot keep the size; or model.padding=VALID) (UNet)"
            )

    def _block(self, features: int, name: str) -> ConvBlock:
        return ConvBlock(
            features,
            num_convs=self.convs_per_block,
            kernel_size=self.kernel_size,
            padding=self.padding,
            norm=self.norm,
            use_bias=self.use_bias,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            layout=self.layout,
            gradient=self.gradient,
            lowering=self.lowering,
            name=name,
        )

    def _dropout(self, x: jax.Array, name: str, train: bool) -> jax.Array:
        if self.dropout_rate == 0.0:
            return x
        if self.dropout_bits == 8:
            return Dropout8(self.dropout_rate, deterministic=not train, name=name)(x)
        return nn.Dropout(self.dropout_rate, deterministic=not train, name=name)(x)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        self._check_input(x)
        channels_first = self.layout == "NCHW"
        if channels_first:
            x = jnp.transpose(x, (0, 3, 1, 2))

        skips = []
        for level in range(1, self.depth + 1):
            x = self._block(self.features * 2 ** (level - 1), f"enc{level}")(x, train=train)
            skips.append(x)
            x = MaxPool2D(2, layout=self.layout, name=f"pool{level}")(x)
            x = self._dropout(x, f"drop_pool{level}", train)

        x = self._block(self.features * 2**self.depth, "bottleneck")(x, train=train)
        class_logits = None
        if self.class_head > 0:
            # The bottleneck sees the whole image at 1/2**depth resolution: the natural
            # place for an image-level benign/malignant/normal decision.
            pooled = jnp.mean(x.astype(jnp.float32), axis=(2, 3) if channels_first else (1, 2))
            class_logits = nn.Dense(self.class_head, param_dtype=self.param_dtype, name="class_head")(pooled)

        aux: list[jax.Array] = []
        for level in range(self.depth, 0, -1):
            features = self.features * 2 ** (level - 1)
            x = ConvTranspose2D(
                features,
                self.up_kernel,
                strides=2,
                padding=self.padding if self.padding == "SAME" else "VALID",
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                method=self.up_method,
                layout=self.layout,
                gradient=self.gradient,
                name=f"up{level}",
            )(x)
            x = CropConcat(layout=self.layout, name=f"concat{level}")(skips[level - 1], x)
            x = self._dropout(x, f"drop_concat{level}", train)
            x = self._block(features, f"dec{level}")(x, train=train)
            if 2 <= level <= self.deep_supervision + 1:
                aux.insert(0, self._head(x, f"aux_head{level}"))

        logits = self._head(x, "head")
        if not train or not aux:
            if class_logits is not None:
                return {"mask": logits, "class": class_logits.astype(jnp.float32)}
            return logits
        out = {"mask": logits, "aux": tuple(aux)}
        if class_logits is not None:
            out["class"] = class_logits.astype(jnp.float32)
        return out

    def _head(self, x: jax.Array, name: str) -> jax.Array:
        """A 1x1 convolution to ``num_classes`` float32 logits, NHWC whatever the layout."""
        logits = Conv2D(
            self.num_classes,
            1,
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            layout=self.layout,
            gradient=self.gradient,
            name=name,
        )(x)
        if self.layout == "NCHW":
            logits = jnp.transpose(logits, (0, 2, 3, 1))
        return logits.astype(jnp.float32)

    def _check_input(self, x: jax.Array) -> None:
        """An NHWC input with ``in_channels`` channels, of a size the preset accepts."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"UNet: input must be (batch, height, width, {self.in_channels}), got shape {tuple(x.shape)}"
            )
        check_input_size(x.shape[1:3], self._size_spec())
        if self.layout not in ("NHWC", "NCHW"):
            raise ValueError(f"UNet: layout must be 'NHWC' or 'NCHW', got {self.layout!r}")

    def _size_spec(self) -> dict[str, Any]:
        return dict(
            depth=self.depth,
            convs_per_block=self.convs_per_block,
            kernel_size=self.kernel_size,
            padding=self.padding,
            up_kernel=self.up_kernel,
        )


# --------------------------------------------------------------------------------------
# Input/output sizes from the layer formulas
# --------------------------------------------------------------------------------------
def _trace_size(n: int, depth: int, convs_per_block: int, kernel_size: int, padding: str, up_kernel: int) -> int | None:
    """Output length for input length ``n``, or ``None`` if ``n`` is not accepted.

    Follows one spatial axis through the network with the report's size formulas.
    Accepted means: every size stays positive and every pooling input is even (so that
    pooling and the stride-2 up-convolution invert each other and skips line up).
    """
    pad = (kernel_size - 1) // 2 if padding == "SAME" else 0
    if padding == "SAME" and kernel_size % 2 == 0:
        return None
    encoder = []
    try:
        for _ in range(depth):
            for _ in range(convs_per_block):
                n = conv_output_size(n, kernel_size, 1, pad)
            if n % 2:
                return None
            encoder.append(n)
            n = pool_output_size(n, 2, 2)
        for _ in range(convs_per_block):
            n = conv_output_size(n, kernel_size, 1, pad)
        for skip in reversed(encoder):
            if padding == "SAME":
                n = 2 * n  # 'SAME' transposed convolution: s * n
            else:
                n = conv_transpose_output_size(n, up_kernel, 2, 0)
            if n > skip:
                return None
            for _ in range(convs_per_block):
                n = conv_output_size(n, kernel_size, 1, pad)
    except ValueError:
        return None
    return n


def unet_output_size(n: int, *, axis: str = "size", **spec: Any) -> int:
    """Output length of a U-Net for input length ``n`` (``spec``: see :func:`check_input_size`).

    ``axis`` (``'height'``, ``'width'``) names the length in the error message, so that a
    refused ``(H, W)`` says which of the two is wrong.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        # Checked first: the pooling rule below would call 0 "uneven", hiding the real error.
        _, smallest = nearest_valid_sizes(1, **spec)
        raise ValueError(
            f"input {axis} must be a positive integer, got {n!r}; "
            f"smallest valid size: {smallest if smallest is not None else 'none'}"
        )
    out = _trace_size(int(n), **spec)
    if out is None:
        raise ValueError(_size_message(int(n), spec, axis))
    return out


def nearest_valid_sizes(n: int, *, search: int = 4096, **spec: Any) -> tuple[int | None, int | None]:
    """The largest accepted size ``<= n`` and the smallest ``>= n`` (``None`` if none)."""
    below = next((m for m in range(n, 0, -1) if _trace_size(m, **spec) is not None), None)
    above = next((m for m in range(max(n, 1), n + search) if _trace_size(m, **spec) is not None), None)
    return below, above


def _size_message(n: int, spec: dict[str, Any], axis: str = "size") -> str:
    below, above = nearest_valid_sizes(n, **spec)
    nearest = " or ".join(str(m) for m in dict.fromkeys((below, above)) if m is not None)
    if spec["padding"] == "SAME":
        rule = f"a multiple of 2**depth = {2 ** spec['depth']}"
    else:
        rule = "a size whose every pooling input is even (unpadded convolutions shrink it)"
    return (
        f"input {axis} {n} cannot pass the {spec['depth']} pooling steps evenly in "
        f"{spec['padding']} mode; expected {rule}; nearest valid sizes: {nearest or 'none'}"
    )


def check_input_size(hw: tuple[int, int], spec: dict[str, Any]) -> tuple[int, int]:
    """Validate an input ``(height, width)`` for a U-Net and return its output size.

    ``spec`` holds ``depth``, ``convs_per_block``, ``kernel_size``, ``padding`` and
    ``up_kernel``. Raises ``ValueError`` naming the axis (``input height 250 ...`` or
    ``input width 250 ...``): non-positive sizes as such, others with the nearest valid
    sizes.
    """
    height, width = (int(n) for n in hw)
    return unet_output_size(height, axis="height", **spec), unet_output_size(width, axis="width", **spec)


# --------------------------------------------------------------------------------------
# Presets: keyword sets for the one UNet definition
# --------------------------------------------------------------------------------------
PRESETS: dict[str, dict[str, Any]] = {
    # Ronneberger et al. 2015 as the report's section 2.2.1 describes it: 64..1024
    # features, unpadded 3x3 convolutions + ReLU, 2x2 max pooling, 2x2 up-convolutions
    # halving the channels, centre-cropped skips, 1x1 head to the paper's 2 classes:
    # 18 + 4 + 1 = 23 convolutional layers; 572x572 -> 388x388.
    "ronneberger": dict(
        features=64,
        depth=4,
        convs_per_block=2,
        kernel_size=3,
        padding="VALID",
        norm="none",
        dropout_rate=0.0,
        up_kernel=2,
        in_channels=1,
        num_classes=2,
        use_bias=True,
    ),
    # The notebook behind the report's numbers (Keras): 16 base features, three 3x3
    # 'same' conv + BN + ReLU per block, dropout 0.2 after every pooling and
    # concatenation, 3x3 stride-2 transposed convolutions, 1x1 sigmoid head, RGB input.
    # Keras BatchNormalization defaults: momentum 0.99, epsilon 1e-3.
    "seed": dict(
        features=16,
        depth=4,
        convs_per_block=3,
        kernel_size=3,
        padding="SAME",
        norm="batch",
        dropout_rate=0.2,
        up_kernel=3,
        in_channels=3,
        num_classes=1,
        use_bias=True,
        bn_momentum=0.99,
        bn_epsilon=1e-3,
    ),
    # The common modern variant: 64-wide, 'same' padding, conv(no bias) + BN + ReLU,
    # 2x2 up-convolutions, grayscale input; PyTorch batch-norm defaults.
    "padded": dict(
        features=64,
        depth=4,
        convs_per_block=2,
        kernel_size=3,
        padding="SAME",
        norm="batch",
        dropout_rate=0.0,
        up_kernel=2,
        in_channels=1,
        num_classes=1,
        use_bias=False,
        bn_momentum=0.9,
        bn_epsilon=1e-5,
    ),
}

DEFAULT_PRESET = "seed"

# The canonical input size of each preset (height = width).
PRESET_SIZES: dict[str, int] = {"ronneberger": 572, "seed": 256, "padded": 256}


def create_unet(preset: str = DEFAULT_PRESET, **overrides: Any) -> UNet:
    """A :class:`UNet` from a named preset, with field overrides (e.g. ``dtype``)."""
    return from_preset("", PRESETS, preset, overrides, UNet)


def fold_batch_norm(model: UNet, variables: dict[str, Any]) -> tuple[UNet, dict[str, Any]]:
    """The inference-mode U-Net with every batch norm folded into the convolution before it.

    ``BN(conv(x) + b) = conv_{w g}(x) + (b - mean) g + beta`` with ``g = scale /
    sqrt(var + eps)`` (running statistics): returns ``(model with norm='none' and biases,
    {"params": folded}))``, equal to ``model.apply(variables, x, train=False)`` up to
    rounding. A model without batch norm is returned as it is.
    """
    if model.norm != "batch":
        return model, variables
    params, stats = variables["params"], variables["batch_stats"]
    folded: dict[str, Any] = {}
    for name, group in params.items():
        if name not in stats:
            folded[name] = group
            continue
        block = {}
        for i in range(1, model.convs_per_block + 1):
            conv, bn, st = group[f"conv{i}"], group[f"bn{i}"], stats[name][f"bn{i}"]
            g = bn["scale"] * jax.lax.rsqrt(st["var"] + model.bn_epsilon)
            bias = conv["bias"] if "bias" in conv else jnp.zeros_like(g)
            block[f"conv{i}"] = {
                "kernel": conv["kernel"] * g.reshape(1, 1, 1, -1),
                "bias": (bias - st["mean"]) * g + bn["bias"],
            }
        folded[name] = block
    return model.clone(norm="none", use_bias=True), {"params": folded}
