"""Convolution, max pooling and transposed convolution written on ``jax.lax`` primitives.

All layers are Flax linen modules working on NHWC arrays (batch, height, width, channels)
by default; ``layout='NCHW'`` (channels first) runs the same math on the other logical
layout with the same parameters, a performance lever measured by benchmarks/cpu_levers.py (model).
Each layer's output shape equals the report's output-size formula, implemented here as
plain functions so that tests, the model summary and input-size validation share one
definition:

* convolution and pooling (the report's output-size formula for a convolutional or
  pooling layer): ``n_out = floor((n + 2p - k) / s) + 1``
* transposed convolution (the report's output size of a transposed convolution, the
  layer of its equation [16]): ``n_out = s (n - 1) + k - 2p (+ output padding)``

Equation numbers: the report's text is not in this repository, so the only number cited
is [16] (the transposed convolution, whose printed equation is garbled; the layers use the
standard definition, see :class:`ConvTranspose2D`). The other formulas are named by what
they compute rather than by a number we cannot check.

With asymmetric padding ``(lo, hi)`` the ``2p`` term reads ``lo + hi``.

Parameter layout follows Flax/TensorFlow: ``kernel`` is ``(kh, kw, in_features,
out_features)`` and ``bias`` is ``(out_features,)`` for both :class:`Conv2D` and
:class:`ConvTranspose2D`, so a kernel trained in one convention is readable in the other.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from unet_jax.layers import lowering as lowerings  # called through the module: tests replace a lowering
from unet_jax.layers import onednn
from unet_jax.layers.conv_grad import conv_explicit_grad, conv_transpose_vjp, interleave, use_explicit_grad
from unet_jax.layers.depthwise import depthwise_conv, use_depthwise_taps

__all__ = [
    "Padding",
    "Conv2D",
    "MaxPool2D",
    "ConvTranspose2D",
    "conv_output_size",
    "pool_output_size",
    "conv_transpose_output_size",
    "subpixel_conv_transpose",
    "matmul_conv_transpose",
    "resolve_transpose_method",
    "TRANSPOSE_METHODS",
    "AUTO_TRANSPOSE_METHOD",
    "tiled_max_pool",
    "resolve_padding",
    "resolve_transpose_padding",
    "he_normal",
    "LAYOUTS",
]

# 'SAME', 'VALID', an int p (p on every side), or explicit ((top, bottom), (left, right)).
Padding = Union[str, int, Sequence[Sequence[int]]]
PadPairs = tuple[tuple[int, int], tuple[int, int]]
# Logical layouts of activations; kernels are always (kh, kw, in, out) (HWIO).
LAYOUTS = ("NHWC", "NCHW")
Initializer = Callable[..., jax.Array]

# How ConvTranspose2D computes (its ``method``; the same parameters and numbers each way).
TRANSPOSE_METHODS = ("auto", "zero_insertion", "interleave", "matmul", "subpixel", "custom_vjp", "onednn")
# What ``method='auto'`` takes per backend and per kernel (``kernel == strides``: "k=s";
# larger: "k>s"). CPU: measured, ``python -m benchmarks.cpu_levers model`` at 128 px in
# float32 (issue 31; benchmarks/results/cpu_levers_up_methods_{seed,padded}_128.json,
# experiments/RESULTS.md): the padded U-Net's 2x2 trains 1.13x faster by matmul; the seed
# U-Net's 3x3 trains 2x slower by interleave or subpixel, so it keeps zero insertion.
# Other backends: issue 31's recommendation (equinox PR #1259's interleave), NOT measured
# until the GPU profile (benchmarks/gpu_profile.py) runs.
AUTO_TRANSPOSE_METHOD = {
    "cpu": {"k=s": "matmul", "k>s": "zero_insertion"},
    "gpu": {"k=s": "interleave", "k>s": "interleave"},
}

# Keras' "he_normal": truncated normal, std sqrt(2 / fan_in) (fan_in = kh * kw * c_in).
he_normal: Initializer = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


# --------------------------------------------------------------------------------------
# The report's size formulas
# --------------------------------------------------------------------------------------
def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def conv_output_size(n: int, k: int, s: int = 1, p: int | tuple[int, int] = 0) -> int:
    """Output length of a convolution: ``floor((n + 2p - k) / s) + 1``.

    Implements the report's output-size formula for a convolutional layer (its equation
    number is not cited: the report's text is not in the repository), with input length
    ``n``, kernel ``k``, stride ``s`` and zero padding ``p`` on each side. ``p`` may be a
    ``(lo, hi)`` pair, in which case ``2p`` becomes ``lo + hi``.

    Raises:
      ValueError: if ``k`` or ``s`` is not positive, or the kernel is larger than the
        padded input (the formula would give a length below 1).
    """
    _check_positive("kernel size", k)
    _check_positive("stride", s)
    lo, hi = (p, p) if isinstance(p, (int, np.integer)) else p
    padded = n + lo + hi
    if padded < k:
        raise ValueError(
            f"kernel size {k} is larger than the padded input {padded} "
            f"(input {n} + padding {lo}+{hi}); expected kernel size <= {padded}"
        )
    return (padded - k) // s + 1


def pool_output_size(n: int, k: int, s: int | None = None, p: int | tuple[int, int] = 0) -> int:
    """Output length of max pooling: ``floor((n + 2p - k) / s) + 1``.

    Implements the report's output-size formula for a pooling layer, which is the
    convolution formula (:func:`conv_output_size`) with window ``k`` in place of the
    kernel and stride ``s`` (default ``k``: non-overlapping windows).
    """
    return conv_output_size(n, k, k if s is None else s, p)


def conv_transpose_output_size(
    n: int, k: int, s: int = 1, p: int | tuple[int, int] = 0, output_padding: int = 0
) -> int:
    """Output length of a transposed convolution: ``s (n - 1) + k - 2p + output_padding``.

    Implements the report's output-size formula for a transposed convolution, the layer of
    the report's equation [16]. That equation is garbled in the report; the size here is
    the one of the standard definition (PyTorch's ``ConvTranspose2d``), which
    :class:`ConvTranspose2D` and :func:`unet_jax.reference.conv_transpose2d` implement.
    ``output_padding`` (PyTorch's, not in the report) adds rows/columns at the
    bottom/right to reach the sizes a strided forward convolution maps onto the same
    input length. ``p`` may be a ``(lo, hi)`` pair.
    """
    _check_positive("kernel size", k)
    _check_positive("stride", s)
    if not 0 <= output_padding < s:
        raise ValueError(f"output_padding must satisfy 0 <= output_padding < stride ({s}), got {output_padding}")
    lo, hi = (p, p) if isinstance(p, (int, np.integer)) else p
    out = s * (n - 1) + k - lo - hi + output_padding
    if out < 1:
        raise ValueError(
            f"padding {lo}+{hi} removes the whole output of a transposed convolution "
            f"(input {n}, kernel {k}, stride {s}); expected lo + hi < {s * (n - 1) + k}"
        )
    return out


# --------------------------------------------------------------------------------------
# Padding specifications
# --------------------------------------------------------------------------------------
def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    try:
        a, b = value  # type: ignore[misc]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    return int(a), int(b)


def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
    # TensorFlow/Keras 'SAME': output ceil(n / s), extra padding at the bottom/right.
    total = max((math.ceil(n / s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


def resolve_padding(
    padding: Padding, spatial: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int]
) -> PadPairs:
    """Turn a padding specification into explicit ``((top, bottom), (left, right))`` pairs.

    ``'VALID'`` is no padding; ``'SAME'`` follows TensorFlow (output ``ceil(n / s)``, odd
    totals put the extra row/column at the bottom/right); an int pads every side.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0), (0, 0)
        if mode == "SAME":
            return (
                _same_pads(spatial[0], kernel[0], strides[0]),
                _same_pads(spatial[1], kernel[1], strides[1]),
            )
        raise ValueError(f"padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        return (int(padding), int(padding)), (int(padding), int(padding))
    try:
        rows, cols = padding  # type: ignore[misc]
        pairs = (_pair("padding", rows), _pair("padding", cols))
    except (TypeError, ValueError):
        raise ValueError(
            f"padding must be 'SAME', 'VALID', an int or ((top, bottom), (left, right)), got {padding!r}"
        ) from None
    if min(min(p) for p in pairs) < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return pairs


def resolve_transpose_padding(padding: Padding, kernel: tuple[int, int], strides: tuple[int, int]) -> PadPairs:
    """Explicit ``((top, bottom), (left, right))`` cropping ``p`` of a transposed convolution.

    ``p`` is the ``p`` of ``s (n - 1) + k - 2p``: rows removed from the full output.
    ``'VALID'`` is ``p = 0`` (the full output ``s (n - 1) + k``). ``'SAME'`` gives an output
    of exactly ``s * n`` and places the kernel as TensorFlow/Keras and ``jax.lax
    .conv_transpose`` do (the adjoint of a 'SAME' strided convolution), so Keras weights
    give Keras outputs.
    """
    if isinstance(padding, str) and padding.upper() == "SAME":
        pairs = []
        for k, s in zip(kernel, strides):
            # Padding of the zero-inserted input, as jax.lax.conv_transpose(..., 'SAME').
            pad_len = k + s - 2
            pad_a = k - 1 if s > k - 1 else math.ceil(pad_len / 2)
            pad_b = pad_len - pad_a
            pairs.append((k - 1 - pad_a, k - 1 - pad_b))
        return pairs[0], pairs[1]
    return resolve_padding(padding, (1, 1), kernel, strides)


# --------------------------------------------------------------------------------------
# Input validation shared by the layers
# --------------------------------------------------------------------------------------
def _layer_label(kind: str, name: str | None) -> str:
    """``"Conv2D 'enc1'"`` inside a parent module, plain ``"Conv2D"`` on its own.

    A layer used on its own has ``name=None``; printing ``Conv2D None`` would read as if
    the layer were missing.
    """
    return f"{kind} {name!r}" if name else kind


def _max_identity(dtype: Any) -> np.ndarray:
    """The smallest value of ``dtype``: the identity of ``max`` and the pooling pad value.

    ``-inf`` for floating dtypes, ``iinfo(dtype).min`` for integers (``-inf`` has no
    integer representation), ``False`` for booleans. Returned as a concrete NumPy scalar,
    not a traced array, so that ``jax.lax.reduce_window`` recognises the max monoid and
    can differentiate it (the gradient flows to each window's arg-max).
    """
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return np.array(-np.inf, dtype=dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return np.array(jnp.iinfo(dtype).min, dtype=dtype)
    if dtype == np.bool_:
        return np.array(False)
    raise ValueError(f"MaxPool2D: input dtype must be floating, integer or bool, got {dtype}")


def _check_input(layer: str, x: jax.Array, in_features: int | None = None, layout: str = "NHWC") -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{layer}: layout must be one of {LAYOUTS}, got {layout!r}")
    if x.ndim != 4:
        axes = "(batch, height, width, channels)" if layout == "NHWC" else "(batch, channels, height, width)"
        raise ValueError(f"{layer}: input must be rank 4 {axes}, got rank {x.ndim} with shape {tuple(x.shape)}")
    if in_features is not None and _channels(x, layout) != in_features:
        raise ValueError(
            f"{layer}: input has {_channels(x, layout)} channels (shape {tuple(x.shape)}, "
            f"{layout}), expected {in_features}"
        )


def _spatial(x: jax.Array, layout: str) -> tuple[int, int]:
    """(height, width) of a rank-4 activation in ``layout``."""
    return tuple(x.shape[1:3]) if layout == "NHWC" else tuple(x.shape[2:4])


def _channels(x: jax.Array, layout: str) -> int:
    return x.shape[-1] if layout == "NHWC" else x.shape[1]


def _check_groups(label: str, groups: int, channels: int, features: int, shape) -> None:
    _check_positive("feature_group_count", groups)
    if channels % groups or features % groups:
        raise ValueError(
            f"{label}: feature_group_count {groups} must divide the input channels ({channels}, "
            f"input shape {tuple(shape)}) and features ({features})"
        )


def _onednn_conv(x: jax.Array, w: jax.Array, strides, pads, layout: str) -> jax.Array:
    """The oneDNN bfloat16 convolution (NHWC inside), in the input's dtype and layout."""
    _require_onednn("lowering 'onednn'", "lowering='lax'")
    nchw = layout == "NCHW"
    y = onednn.conv_bf16(jnp.transpose(x, (0, 2, 3, 1)) if nchw else x, w, strides, _int_pairs(pads))
    return (jnp.transpose(y, (0, 3, 1, 2)) if nchw else y).astype(x.dtype)


def _onednn_conv_transpose(x: jax.Array, w: jax.Array, strides, crop, out_pad, layout: str) -> jax.Array:
    """The oneDNN bfloat16 transposed convolution (NHWC inside), in the input's dtype and layout."""
    _require_onednn("method 'onednn'", "another method")
    nchw = layout == "NCHW"
    y = onednn.conv_transpose_bf16(jnp.transpose(x, (0, 2, 3, 1)) if nchw else x, w, strides, crop, out_pad)
    return (jnp.transpose(y, (0, 3, 1, 2)) if nchw else y).astype(x.dtype)


def _require_onednn(what: str, instead: str) -> None:
    if not onednn.available():
        raise RuntimeError(
            f"{what} needs the CPU backend and the oneDNN build (unet_jax.layers.onednn; "
            f"{onednn.INSTALL_HINT}); use {instead} elsewhere"
        )


def _add_bias(y: jax.Array, b: jax.Array | None, layout: str) -> jax.Array:
    if b is None:
        return y
    return y + (b.reshape(1, 1, 1, -1) if layout == "NHWC" else b.reshape(1, -1, 1, 1))


def _int_pairs(pads: Sequence[Sequence[int]]) -> PadPairs:
    """Padding pairs as a hashable tuple of Python ints (a static argument)."""
    (top, bottom), (left, right) = pads
    return (int(top), int(bottom)), (int(left), int(right))


def _tuple2(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    pair = _pair(name, value)
    for v in pair:
        if v < 1:
            raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


# --------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------
def _kernel_and_bias(
    layer: Any, kernel: tuple[int, int], x: jax.Array, groups: int = 1
) -> tuple[jax.Array, jax.Array, Any]:
    """The ``(kh, kw, in / groups, out)`` kernel and ``(out,)`` bias of a (transposed)
    convolution, and the input, all cast to the layer's computation dtype."""
    w = layer.param(
        "kernel", layer.kernel_init, (*kernel, _channels(x, layer.layout) // groups, layer.features), layer.param_dtype
    )
    b = layer.param("bias", layer.bias_init, (layer.features,), layer.param_dtype) if layer.use_bias else None
    return nn.dtypes.promote_dtype(x, w, b, dtype=layer.dtype)


class Conv2D(nn.Module):
    """2-D convolution (cross-correlation, as in every deep-learning framework).

    ``y[b, i, j, o] = bias[o] + sum_{u, v, c} xpad[b, s_h i + u, s_w j + v, c] kernel[u, v, c, o]``

    the report's convolution sum over the receptive field, for every output channel.
    With ``feature_group_count = G`` the channels split into ``G`` groups and output
    channel ``o`` (of group ``g = o // (features / G)``) sums only over the input channels
    of its group, ``c = g (C_in / G) + c'``: ``kernel[u, v, c', o]``, ``c' < C_in / G``.
    ``G = C_in = features`` is the depthwise convolution (one ``kh x kw`` filter per
    channel) of MobileNet-style blocks (PyTorch's ``groups``).

    Shapes: ``(N, H, W, C_in) -> (N, H_out, W_out, features)`` with ``H_out =
    conv_output_size(H, kh, s_h, (top, bottom))``; kernel ``(kh, kw, C_in / G, features)``.

    Attributes:
      features: output channels.
      kernel_size: ``k`` or ``(kh, kw)``.
      strides: ``s`` or ``(s_h, s_w)``, positive.
      padding: ``'SAME'``, ``'VALID'``, an int, or ``((top, bottom), (left, right))``.
      use_bias: add a learned bias.
      in_features: optional expected input channel count (checked at call time).
      feature_group_count: ``G``, dividing both ``C_in`` and ``features`` (1: a full
        convolution; ``C_in``: depthwise).
      dtype: computation dtype (e.g. ``jnp.bfloat16`` for mixed precision); ``None`` keeps
        the input's dtype promoted with the parameters'.
      param_dtype: parameter storage dtype.
      kernel_init: He-normal by default, as the report's Keras notebook.
      layout: ``'NHWC'`` or ``'NCHW'`` (input and output ``(N, C, H, W)``; same kernel).
      gradient: how the convolution is differentiated: ``'auto'`` (default; written-out
        canonical gradients on the CPU backend, where XLA:CPU otherwise runs the gradients
        inside a ``lax.scan`` 25x slower, JAX's own elsewhere), ``'xla'`` (JAX's autodiff,
        forward and reverse mode) or ``'explicit'``
        (:func:`unet_jax.conv_grad.conv_explicit_grad`, reverse mode only; NHWC, no groups).
      lowering: how the convolution is computed (:mod:`unet_jax.lowering`), the same
        parameters and, up to rounding, the same outputs: ``'lax'`` (XLA's convolution,
        the default), ``'direct'`` (the sum, unrolled; for 1-3 input channels),
        ``'stem'`` (the direct sum forward, the kernel gradient as one patch-matrix
        product; a network's first layer; reverse mode only), ``'im2col'`` (patches + one
        GEMM), ``'winograd2'`` / ``'winograd4'``
        (Winograd ``F(2x2, 3x3)`` / ``F(4x4, 3x3)``; 3x3 kernels, stride 1 only),
        ``'auto'`` (the machine's tuned table's fastest for inference,
        :func:`unet_jax.lowering.choose_lowering`; ``'lax'`` without a table or where the
        choice cannot apply), ``'auto-train'`` (the table's fastest forward + backward) or
        ``'onednn'`` (bfloat16 on the CPU's AMX units through oneDNN,
        :func:`unet_jax.layers.onednn.conv_bf16`: inputs and kernel rounded to bfloat16,
        float32 accumulation, the output cast to the input's dtype; reverse mode only; an
        optional build that needs ``g++`` and ``libdnnl-dev``; a layer with fewer than
        ``onednn.MIN_CHANNELS`` input channels, a network's first, stays on ``'lax'``). The non-lax lowerings work
        on NHWC: with ``layout='NCHW'`` the input and output are transposed around them.
        A forced lowering that cannot compute the layer
        (grouped convolution; Winograd with another kernel or stride) is a ValueError.

    A depthwise convolution (``feature_group_count = C_in = features``, NHWC, lowering
    ``'lax'``) takes :func:`unet_jax.layers.depthwise.depthwise_conv` (shifted
    multiply-adds with written-out gradients; XLA:CPU's grouped convolution is 25-70x
    slower) wherever ``gradient`` takes the explicit path (``'auto'`` on the CPU,
    ``'explicit'``); ``gradient='xla'`` keeps ``lax``'s grouped convolution.
    """

    features: int
    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    padding: Padding = "SAME"
    use_bias: bool = True
    in_features: int | None = None
    feature_group_count: int = 1
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = he_normal
    bias_init: Initializer = nn.initializers.zeros
    layout: str = "NHWC"
    gradient: str = "auto"
    lowering: str = "lax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input(_layer_label("Conv2D", self.name), x, self.in_features, self.layout)
        _check_positive("features", self.features)
        kernel = _tuple2("kernel_size", self.kernel_size)
        strides = _tuple2("strides", self.strides)
        hw = _spatial(x, self.layout)
        pads = resolve_padding(self.padding, hw, kernel, strides)
        for axis in (0, 1):
            conv_output_size(hw[axis], kernel[axis], strides[axis], pads[axis])
        groups = self.feature_group_count
        channels = _channels(x, self.layout)
        _check_groups(_layer_label("Conv2D", self.name), groups, channels, self.features, x.shape)

        nhwc_shape = tuple(x.shape) if self.layout == "NHWC" else (x.shape[0], *hw, channels)
        try:
            lowering = lowerings.resolve_lowering(
                self.lowering,
                kernel=kernel,
                strides=strides,
                groups=groups,
                shape=nhwc_shape,
                out_features=self.features,
                pads=pads,
            )
        except ValueError as err:
            raise ValueError(f"{_layer_label('Conv2D', self.name)}: {err}") from None
        if use_depthwise_taps(self.gradient, self.layout, groups, channels, self.features, self.lowering):
            x, w, b = _kernel_and_bias(self, kernel, x, groups)
            return _add_bias(depthwise_conv(x, w, strides, _int_pairs(pads)), b, self.layout)
        explicit = use_explicit_grad(self.gradient, self.layout, groups, _layer_label("Conv2D", self.name))
        x, w, b = _kernel_and_bias(self, kernel, x, groups)
        if lowering == lowerings.ONEDNN and channels >= onednn.MIN_CHANNELS:
            return _add_bias(_onednn_conv(x, w, strides, pads, self.layout), b, self.layout)
        lowering = "lax" if lowering == lowerings.ONEDNN else lowering
        if lowering != "lax":
            # The lowerings are written on NHWC; NCHW pays two transposes for them.
            if self.layout == "NCHW":
                x = jnp.transpose(x, (0, 2, 3, 1))
            y = lowerings.lower_conv(lowering, x, w, strides, pads, self.precision)
            if self.layout == "NCHW":
                y = jnp.transpose(y, (0, 3, 1, 2))
            return _add_bias(y, b, self.layout)
        if explicit:
            return _add_bias(
                conv_explicit_grad(x, w, strides, _int_pairs(pads), (1, 1), self.precision), b, self.layout
            )
        y = jax.lax.conv_general_dilated(
            x,
            w,
            window_strides=strides,
            padding=pads,
            dimension_numbers=(self.layout, "HWIO", self.layout),
            feature_group_count=groups,
            precision=self.precision,
        )
        return _add_bias(y, b, self.layout)


def _tiles(x: jax.Array, window: tuple[int, int], layout: str) -> tuple[jax.Array, tuple[int, int]]:
    """``x`` cut to whole windows and reshaped so that each window has its own two axes:
    NHWC ``(N, H_out, kh, W_out, kw, C)``, NCHW ``(N, C, H_out, kh, W_out, kw)``; and those
    two axes."""
    kh, kw = window
    if layout == "NHWC":
        n, h, w, c = x.shape
        return x[:, : h // kh * kh, : w // kw * kw].reshape(n, h // kh, kh, w // kw, kw, c), (2, 4)
    n, c, h, w = x.shape
    return x[:, :, : h // kh * kh, : w // kw * kw].reshape(n, c, h // kh, kh, w // kw, kw), (3, 5)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def tiled_max_pool(x: jax.Array, window: tuple[int, int], layout: str = "NHWC") -> jax.Array:
    """Max pooling whose windows tile the input (stride = window, no padding; rows and
    columns past the last whole window are dropped, as ``'VALID'``): a reshape and a max.

    The gradient goes to the first maximum of each window in row-major order, as
    ``reduce_window``'s (``select_and_scatter``) does, but as a few elementwise operations:
    XLA:CPU runs the ``select_and_scatter`` gradient as an index-tracking reduction about
    12x slower (16x128x128x16, one core: 87 ms -> 7 ms forward + backward).
    """
    tiles, axes = _tiles(x, window, layout)
    return jnp.max(tiles, axis=axes)


def _tiled_max_pool_forward(x, window, layout):
    y = tiled_max_pool(x, window, layout)
    return y, (x, y)


def _tiled_max_pool_backward(window, layout, residuals, dy):
    x, y = residuals
    tiles, axes = _tiles(x, window, layout)
    y, dy = jnp.expand_dims(y, axes), jnp.expand_dims(dy, axes)
    taken = jnp.zeros(y.shape, bool)
    rows = []
    for u in range(window[0]):
        row = []
        for v in range(window[1]):
            index = [slice(None)] * tiles.ndim
            index[axes[0]], index[axes[1]] = slice(u, u + 1), slice(v, v + 1)
            hit = tiles[tuple(index)] == y
            row.append(jnp.where(hit & ~taken, dy, jnp.zeros((), dy.dtype)))  # first maximum only
            taken = taken | hit
        rows.append(jnp.concatenate(row, axis=axes[1]))
    dx = jnp.concatenate(rows, axis=axes[0])
    shape = list(tiles.shape)
    cropped = (
        shape[: axes[0] - 1]
        + [shape[axes[0] - 1] * shape[axes[0]]]
        + [shape[axes[1] - 1] * shape[axes[1]]]
        + shape[axes[1] + 1 :]
    )
    spatial = (1, 2) if layout == "NHWC" else (2, 3)
    pads = [(0, x.shape[a] - cropped[a]) if a in spatial else (0, 0) for a in range(4)]
    return (jnp.pad(dx.reshape(cropped), pads),)


tiled_max_pool.defvjp(_tiled_max_pool_forward, _tiled_max_pool_backward)


class MaxPool2D(nn.Module):
    """Max pooling: ``y[b, i, j, c] = max_{u < k_h, v < k_w} xpad[b, s_h i + u, s_w j + v, c]``.

    The report's max over each window. Padding is with the dtype's smallest value (``-inf``
    for floats, ``iinfo(dtype).min`` for integers) so padded positions never win.
    Overlapping windows (stride smaller than window) are allowed. Windows that tile the
    input (stride = window, no padding; the U-Nets' 2x2 pools) take
    :func:`tiled_max_pool`: the same values and gradient, computed faster.

    Shapes: ``(N, H, W, C) -> (N, pool_output_size(H, kh, s_h, p), ..., C)`` (``layout
    'NCHW'``: ``(N, C, H, W) -> (N, C, H_out, W_out)``).
    """

    window: int | Sequence[int] = 2
    strides: int | Sequence[int] | None = None
    padding: Padding = "VALID"
    layout: str = "NHWC"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input(_layer_label("MaxPool2D", self.name), x, layout=self.layout)
        window = _tuple2("window", self.window)
        strides = window if self.strides is None else _tuple2("strides", self.strides)
        hw = _spatial(x, self.layout)
        pads = resolve_padding(self.padding, hw, window, strides)
        for axis in (0, 1):
            pool_output_size(hw[axis], window[axis], strides[axis], pads[axis])
        if strides == window and pads == ((0, 0), (0, 0)):
            return tiled_max_pool(x, window, self.layout)
        if self.layout == "NHWC":
            dims, steps, padding = (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
        else:
            dims, steps, padding = (1, 1, *window), (1, 1, *strides), ((0, 0), (0, 0), *pads)
        return jax.lax.reduce_window(
            x,
            _max_identity(x.dtype),
            jax.lax.max,
            window_dimensions=dims,
            window_strides=steps,
            padding=padding,
        )


class ConvTranspose2D(nn.Module):
    """Transposed convolution by zero insertion, then an ordinary convolution.

    Standard definition (PyTorch's ``ConvTranspose2d``; the adjoint of :class:`Conv2D` for
    the same kernel with its in/out axes swapped): every input pixel scatters a scaled copy
    of the kernel into the output,

    ``y[b, s_h i + u - p_top, s_w j + v - p_left, o] += x[b, i, j, c] kernel[u, v, c, o]``.

    Implemented as the report describes: insert ``s - 1`` zeros between input pixels
    (``lhs_dilation``), pad by ``k - 1 - p`` (plus ``output_padding`` at the bottom/right),
    and correlate with the spatially flipped kernel.

    Shapes: ``(N, H, W, C_in) -> (N, s (H - 1) + k - p_top - p_bottom + output_padding, ...,
    features)``.

    Attributes:
      features: output channels.
      kernel_size, strides: as :class:`Conv2D`.
      padding: ``p`` of the size formula: ``'VALID'`` (``p = 0``, full output),
        ``'SAME'`` (output ``s * n``, placed as Keras/TensorFlow), an int, or pairs.
      output_padding: extra rows/columns at the bottom/right, ``0 <= op < stride``.
      method: how it computes (:data:`TRANSPOSE_METHODS`; the same parameters and numbers):
        ``'zero_insertion'`` (the report's construction above, the zeros as the
        convolution's ``lhs_dilation``); ``'interleave'`` (the zeros inserted by one
        ``lax.pad`` with interior padding, then a stride-1 convolution: equinox PR #1259's
        fix for the lhs-dilated kernel gradient that cuDNN cannot take, issue 31);
        ``'matmul'`` (``kernel == strides`` only: each input pixel's ``k_h k_w F`` outputs
        are one matrix product, then a reshape, :func:`matmul_conv_transpose`);
        ``'subpixel'`` (one ordinary convolution on the input grid, whose ``s_h s_w`` groups
        of output channels are the output's phases, interleaved by depth-to-space:
        :func:`subpixel_conv_transpose`; ``s_h s_w`` times fewer FLOPs for ``k = s``);
        ``'custom_vjp'`` (the lhs-dilated forward with its own VJP whose kernel gradient is
        a canonical convolution, :func:`unet_jax.layers.conv_grad.conv_transpose_vjp`);
        ``'onednn'`` (bfloat16 on the CPU's AMX units: oneDNN's backward-data pass of the
        adjoint convolution, :func:`unet_jax.layers.onednn.conv_transpose_bf16`; the
        output in the input's dtype; paddings within ``(k - 1) // 2``; reverse mode only);
        ``'auto'`` (per backend and kernel, :data:`AUTO_TRANSPOSE_METHOD`).
      layout: ``'NHWC'`` or ``'NCHW'``, as :class:`Conv2D`.
      gradient: ``'auto'``, ``'xla'`` or ``'explicit'``, as :class:`Conv2D`.
    """

    features: int
    kernel_size: int | Sequence[int] = 2
    strides: int | Sequence[int] = 2
    padding: Padding = "VALID"
    output_padding: int | Sequence[int] = 0
    method: str = "auto"
    use_bias: bool = True
    in_features: int | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Initializer = he_normal
    bias_init: Initializer = nn.initializers.zeros
    layout: str = "NHWC"
    gradient: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _check_input(_layer_label("ConvTranspose2D", self.name), x, self.in_features, self.layout)
        _check_positive("features", self.features)
        kernel = _tuple2("kernel_size", self.kernel_size)
        strides = _tuple2("strides", self.strides)
        out_pad = _pair("output_padding", self.output_padding)
        crop = resolve_transpose_padding(self.padding, kernel, strides)
        hw = _spatial(x, self.layout)
        for axis in (0, 1):
            conv_transpose_output_size(hw[axis], kernel[axis], strides[axis], crop[axis], out_pad[axis])

        label = _layer_label("ConvTranspose2D", self.name)
        try:
            method = resolve_transpose_method(self.method, kernel, strides)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
        x, w, b = _kernel_and_bias(self, kernel, x)
        explicit = use_explicit_grad(self.gradient, self.layout, 1, label)
        y = _conv_transpose(method, x, w, strides, crop, out_pad, self.precision, self.layout, explicit)
        return _add_bias(y, b, self.layout)


def resolve_transpose_method(method: str, kernel: tuple[int, int], strides: tuple[int, int]) -> str:
    """The method a :class:`ConvTranspose2D` runs: ``method`` itself, or for ``'auto'`` the
    backend's entry of :data:`AUTO_TRANSPOSE_METHOD` (the CPU's, or the GPU's on any other
    backend). ``'matmul'`` needs ``kernel == strides``; an unknown name is an error."""
    if method not in TRANSPOSE_METHODS:
        raise ValueError(f"method must be one of {TRANSPOSE_METHODS}, got {method!r}")
    if method == "auto":
        table = AUTO_TRANSPOSE_METHOD["cpu" if jax.default_backend() == "cpu" else "gpu"]
        method = table["k=s" if kernel == strides else "k>s"]
    if method == "matmul" and kernel != strides:
        raise ValueError(f"method 'matmul' needs kernel_size == strides, got {kernel} and {strides}")
    return method


def _conv_transpose(
    method: str,
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    crop: PadPairs,
    out_pad: tuple[int, int],
    precision: Any,
    layout: str,
    explicit: bool,
) -> jax.Array:
    """The transposed convolution of :class:`ConvTranspose2D` (no bias) by ``method``."""
    if method == "subpixel":
        return subpixel_conv_transpose(x, w, strides, crop, out_pad, precision, layout, explicit)
    if method == "matmul":
        return matmul_conv_transpose(x, w, crop, out_pad, precision, layout)
    if method == "onednn":
        return _onednn_conv_transpose(x, w, strides, crop, out_pad, layout)
    flipped = jnp.flip(w, axis=(0, 1))
    # Padding of the zero-inserted input: k - 1 - p on each side, output_padding after.
    pads = _int_pairs([(k - 1 - lo, k - 1 - hi + op) for k, (lo, hi), op in zip(w.shape[:2], crop, out_pad)])
    if method == "custom_vjp":
        return conv_transpose_vjp(x, flipped, strides, pads, precision, layout, explicit)
    if method == "interleave":
        x, pads, strides = interleave(x, strides, pads, layout), ((0, 0), (0, 0)), (1, 1)
    if explicit:
        return conv_explicit_grad(x, flipped, (1, 1), pads, strides, precision)
    return jax.lax.conv_general_dilated(
        x,
        flipped,
        window_strides=(1, 1),
        padding=pads,
        lhs_dilation=strides,
        dimension_numbers=(layout, "HWIO", layout),
        precision=precision,
    )


def matmul_conv_transpose(
    x: jax.Array,
    w: jax.Array,
    crop: PadPairs,
    output_padding: tuple[int, int] = (0, 0),
    precision: Any = None,
    layout: str = "NHWC",
) -> jax.Array:
    """A transposed convolution whose kernel equals its stride (no bias) as one matrix
    product per input pixel: the kernel's windows tile the output without overlap, so
    ``y[b, s i + u, s j + v, o] = sum_c x[b, i, j, c] w[u, v, c, o]`` is an einsum, then a
    reshape; then the crops ``p`` and ``output_padding``'s zero rows (one ``lax.pad``).

    x: (N, H, W, C) (``layout='NCHW'``: (N, C, H, W)); w: (s_h, s_w, C, F).
    """
    kh, kw, _, f = w.shape
    if layout == "NHWC":
        n, h, wd, _ = x.shape
        y = jnp.einsum("nijc,uvco->niujvo", x, w, precision=precision).reshape(n, h * kh, wd * kw, f)
    else:
        n, _, h, wd = x.shape
        y = jnp.einsum("ncij,uvco->noiujv", x, w, precision=precision).reshape(n, f, h * kh, wd * kw)
    spatial = tuple((-lo, op - hi, 0) for (lo, hi), op in zip(crop, output_padding))
    none = ((0, 0, 0),)
    config = none + spatial + none if layout == "NHWC" else none + none + spatial
    return jax.lax.pad(y, jnp.zeros((), y.dtype), config)


def _subpixel_axis(n: int, k: int, s: int, crop: tuple[int, int], op: int) -> tuple[np.ndarray, int, int, int, int]:
    """One axis of :func:`subpixel_conv_transpose`.

    Output position ``o = s q + t`` (phase ``t``) receives ``x[i] w[u]`` for ``s i + u = o +
    p_lo``: the taps ``u = r + s m`` (``r = (t + p_lo) mod s``) at ``i = q + c - m`` (``c =
    (t + p_lo) div s``). So phase ``t`` is a correlation of ``x`` with those taps, reversed,
    over the input offsets ``j = c - m``. Returns ``(taps, j0, pad_lo, pad_hi, n_out)``:
    ``taps[j - j0, t]`` is the kernel index feeding offset ``j`` of phase ``t`` (``k``: none),
    and the input padding that gives every phase ``ceil(n_out / s)`` outputs.
    """
    lo, hi = crop
    n_out = s * (n - 1) + k - lo - hi + op
    offsets = {}
    for t in range(s):
        r, c = (t + lo) % s, (t + lo) // s
        for m in range(-(-(k - r) // s)):  # taps r, r + s, ... below k
            offsets[(t, c - m)] = r + s * m
    js = [j for _, j in offsets]
    j0, j1 = min(js), max(js)
    taps = np.full((j1 - j0 + 1, s), k, np.int32)
    for (t, j), u in offsets.items():
        taps[j - j0, t] = u
    q = -(-n_out // s)
    pad_lo = -j0
    pad_hi = q - n - pad_lo + (j1 - j0)  # the correlation then has q outputs
    return taps, j0, pad_lo, pad_hi, n_out


def subpixel_conv_transpose(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    crop: PadPairs,
    output_padding: tuple[int, int] = (0, 0),
    precision: Any = None,
    layout: str = "NHWC",
    explicit_grad: bool = False,
) -> jax.Array:
    """The transposed convolution of :class:`ConvTranspose2D` (no bias) as one convolution
    on the input grid followed by depth-to-space.

    x: (N, H, W, C) (``layout='NCHW'``: (N, C, H, W)); w: (kh, kw, C, F); ``crop`` the ``p``
    pairs of the size formula. The
    ``s_h s_w`` output phases get their own ``F`` output channels of one convolution whose
    kernel holds, for each phase, the taps of ``w`` that reach it (zeros elsewhere); the
    phases are then interleaved and the result cut to ``conv_transpose_output_size``.
    ``explicit_grad`` (NHWC only) differentiates the convolution with
    :func:`unet_jax.conv_grad.conv_explicit_grad`.
    """
    (sh, sw), (kh, kw) = strides, w.shape[:2]
    if layout == "NHWC":
        n, h, wd, c = x.shape
    else:
        n, c, h, wd = x.shape
    f = w.shape[-1]
    th, _, plh, phh, oh = _subpixel_axis(h, kh, sh, crop[0], output_padding[0])
    tw, _, plw, phw, ow = _subpixel_axis(wd, kw, sw, crop[1], output_padding[1])
    # w with a zero row and column at index k: "no tap".
    w_ext = jnp.pad(w, ((0, 1), (0, 1), (0, 0), (0, 0)))
    k = w_ext[th[:, None, :, None], tw[None, :, None, :]]  # (Mh, Mw, sh, sw, C, F)
    k = jnp.transpose(k, (0, 1, 4, 2, 3, 5)).reshape(th.shape[0], tw.shape[0], c, sh * sw * f)
    pads = ((plh, phh), (plw, phw))
    if min(min(p) for p in pads) < 0:  # a crop larger than the kernel's reach: cut x first
        spatial = ((plh, phh, 0), (plw, phw, 0))
        none = ((0, 0, 0),)
        config = none + spatial + none if layout == "NHWC" else none + none + spatial
        x = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
        pads = ((0, 0), (0, 0))
    if explicit_grad:
        y = conv_explicit_grad(x, k, (1, 1), _int_pairs(pads), (1, 1), precision)
    else:
        y = jax.lax.conv_general_dilated(
            x, k, window_strides=(1, 1), padding=pads, dimension_numbers=(layout, "HWIO", layout), precision=precision
        )
    if layout == "NHWC":
        qh, qw = y.shape[1], y.shape[2]
        y = y.reshape(n, qh, qw, sh, sw, f).transpose(0, 1, 3, 2, 4, 5).reshape(n, qh * sh, qw * sw, f)
        return y[:, :oh, :ow, :]
    # Channels (sh, sw, f) -> (n, f, qh, sh, qw, sw): the same interleaving, channels first.
    qh, qw = y.shape[2], y.shape[3]
    y = y.reshape(n, sh, sw, f, qh, qw).transpose(0, 3, 4, 1, 5, 2).reshape(n, f, qh * sh, qw * sw)
    return y[:, :, :oh, :ow]
