"""The depthwise convolution (one ``kh x kw`` filter per channel) and its two gradients,
written out as shifted multiply-adds.

Why this module exists: XLA:CPU runs a grouped convolution with ``feature_group_count =
C`` on a generic loop nest, 25-70x slower than PyTorch's depthwise kernels (issue 29,
3x3 at batch 16: 153 ms against 2.2 ms forward at 64x64x96), and its autodiff gradients
are grouped convolutions too. A depthwise convolution is only ``kh * kw`` elementwise
products of shifted views, one per kernel tap; each gradient is the same shape of
computation, so all three are written here as sums over taps that XLA fuses into loops
over the channel-minor (NHWC) arrays.

One spatial axis, stride ``s``, padding ``(lo, hi)``, kernel ``k``, ``xp`` the padded
input (the report's convolution sum, restricted to one channel):

* forward: ``y[i] = sum_u xp[s i + u] w[u]`` (:func:`depthwise_forward`);
* input gradient: ``dxp[s i + u] += dy[i] w[u]``, i.e. the output gradient dilated by
  ``s`` (``s - 1`` zeros between rows), padded by ``k - 1 - lo`` below and correlated
  with the flipped kernel, then cut to the input's length
  (:func:`depthwise_input_grad`);
* kernel gradient: ``dw[u] = sum_{n, i} xp[s i + u] dy[i]``: per tap, the product of a
  strided view of the input with the output gradient, reduced over batch and space
  (:func:`depthwise_kernel_grad`).

All three equal ``jax.lax.conv_general_dilated(..., feature_group_count=C)`` and its
autodiff (tests/test_depthwise.py, against ``lax`` and the literal sum of
``unet_jax.layers.reference``). :func:`depthwise_conv` ties them together with a
``custom_vjp`` (reverse mode only, like :mod:`.conv_grad`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "depthwise_conv",
    "depthwise_forward",
    "depthwise_input_grad",
    "depthwise_kernel_grad",
    "images_per_chunk",
    "use_depthwise_taps",
]

PadPairs = tuple[tuple[int, int], tuple[int, int]]


def _out_len(n: int, k: int, s: int, pads: tuple[int, int]) -> int:
    return (n + pads[0] + pads[1] - k) // s + 1


def _tap(xp: jax.Array, u: int, v: int, out_hw: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    """``xp[:, s_h i + u, s_w j + v, :]`` for every output position ``(i, j)``."""
    (ho, wo), (sh, sw) = out_hw, strides
    n, _, _, c = xp.shape
    return jax.lax.slice(xp, (0, u, v, 0), (n, u + sh * (ho - 1) + 1, v + sw * (wo - 1) + 1, c), (1, sh, sw, 1))


def _pad(x: jax.Array, pads: PadPairs) -> jax.Array:
    zero = jnp.zeros((), x.dtype)
    return jax.lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def depthwise_forward(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: PadPairs) -> jax.Array:
    """``(N, H, W, C), (kh, kw, 1, C) -> (N, H_out, W_out, C)``: ``y = sum_{u, v}
    xp[:, s_h i + u, s_w j + v, c] w[u, v, 0, c]``, accumulated in the inputs' dtype
    (float32 stays float32; a bfloat16 product is summed in float32 and cast back)."""
    kh, kw = w.shape[:2]
    out_hw = (_out_len(x.shape[1], kh, strides[0], pads[0]), _out_len(x.shape[2], kw, strides[1], pads[1]))
    xp = _pad(x, pads)
    acc_dtype = x.dtype if jnp.finfo(x.dtype).bits > 32 else jnp.float32
    y = None
    for u in range(kh):
        for v in range(kw):
            term = _tap(xp, u, v, out_hw, strides).astype(acc_dtype) * w[u : u + 1, v : v + 1].astype(acc_dtype)
            y = term if y is None else y + term
    return y.astype(x.dtype)


def depthwise_input_grad(
    dy: jax.Array, w: jax.Array, in_hw: tuple[int, int], strides: tuple[int, int], pads: PadPairs
) -> jax.Array:
    """The input gradient ``(N, H, W, C)`` of :func:`depthwise_forward` for output
    gradient ``dy``: ``dy`` dilated by the stride, padded by ``k - 1 - lo`` below (and to
    the input's length above; negative pads cut), correlated with the flipped kernel."""
    kh, kw = w.shape[:2]
    pairs = []
    for axis, k in ((0, kh), (1, kw)):
        s, lo, n = strides[axis], pads[axis][0], in_hw[axis]
        dilated = s * (dy.shape[1 + axis] - 1) + 1
        pairs.append((k - 1 - lo, n + lo - dilated, s - 1))
    zero = jnp.zeros((), dy.dtype)
    z = jax.lax.pad(dy, zero, ((0, 0, 0), pairs[0], pairs[1], (0, 0, 0)))
    return depthwise_forward(z, w[::-1, ::-1], (1, 1), ((0, 0), (0, 0)))


# The kernel gradient's working set per scan step: an image chunk's padded input (and the
# output gradient beside it) stays in a core's L2 cache while all taps read it. Measured
# (issue 29, batch 16, 3x3, random output gradient, 2 cores): 64x64x96 takes 76-82 ms as
# one reduction over the batch, 12-30 ms in chunks of 1-2 images (runs vary); 32x32x144
# 7.6 -> 4.3 ms.
KERNEL_GRAD_CHUNK_BYTES = 3 * 2**20


def images_per_chunk(x_shape: tuple[int, ...], itemsize: int = 4, budget: int = KERNEL_GRAD_CHUNK_BYTES) -> int:
    """The largest divisor of the batch ``x_shape[0]`` whose images take at most ``budget``
    bytes (at least 1): the chunk :func:`depthwise_kernel_grad` reduces per scan step."""
    n = x_shape[0]
    per_image = itemsize * max(1, int(np.prod(x_shape[1:])))
    return max(c for c in range(1, n + 1) if n % c == 0 and (c == 1 or c * per_image <= budget))


def _kernel_grad_one_pass(
    x: jax.Array, dy: jax.Array, kernel: tuple[int, int], strides: tuple[int, int], pads: PadPairs
) -> jax.Array:
    xp = _pad(x, pads)
    out_hw = dy.shape[1:3]
    dy32 = dy.astype(jnp.float32)
    products = [
        _tap(xp, u, v, out_hw, strides).astype(jnp.float32) * dy32 for u in range(kernel[0]) for v in range(kernel[1])
    ]
    zeros = [jnp.zeros((), jnp.float32)] * len(products)
    rows = jax.lax.reduce(products, zeros, lambda a, b: [p + q for p, q in zip(a, b)], (0, 1))
    return jnp.stack([r.sum(axis=0) for r in rows]).reshape(kernel[0], kernel[1], 1, -1)


def depthwise_kernel_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel: tuple[int, int],
    strides: tuple[int, int],
    pads: PadPairs,
    chunk: int | None = None,
) -> jax.Array:
    """The kernel gradient ``(kh, kw, 1, C)``: ``dw[u, v, 0, c] = sum_{n, i, j}
    xp[n, s_h i + u, s_w j + v, c] dy[n, i, j, c]``, summed in float32.

    All ``kh * kw`` taps are one variadic reduction (``lax.reduce`` over a list of
    operands), so XLA reads the input and the output gradient once for all taps instead
    of once per tap (5-6x faster at 16x16x240, 5x5, batch 16, than one reduction per
    tap); it reduces batch and rows first, then the columns of the small remainder. That
    reduction runs over ``chunk`` images at a time in a ``lax.scan`` (default
    :func:`images_per_chunk`: the chunk stays in L2 while every tap reads it, measured
    up to 6x faster at 64x64x96); ``chunk`` must divide the batch."""
    n = x.shape[0]
    chunk = images_per_chunk(x.shape, x.dtype.itemsize) if chunk is None else chunk
    if chunk <= 0 or n % chunk:
        raise ValueError(f"chunk={chunk} must be a positive divisor of the batch size {n}")
    if chunk == n:
        return _kernel_grad_one_pass(x, dy, kernel, strides, pads)
    xs = x.reshape(n // chunk, chunk, *x.shape[1:])
    dys = dy.reshape(n // chunk, chunk, *dy.shape[1:])

    def accumulate(total: jax.Array, pair: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        return total + _kernel_grad_one_pass(pair[0], pair[1], kernel, strides, pads), None

    zeros = jnp.zeros((*kernel, 1, x.shape[-1]), jnp.float32)
    return jax.lax.scan(accumulate, zeros, (xs, dys))[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: PadPairs) -> jax.Array:
    """Depthwise convolution ``(N, H, W, C), (kh, kw, 1, C) -> (N, H_out, W_out, C)``
    (``lax`` with ``feature_group_count = C``), with the written-out gradients above.
    ``strides`` and ``pads`` (``((top, bottom), (left, right))``) are static."""
    return depthwise_forward(x, w, strides, pads)


def _fwd(x, w, strides, pads):
    return depthwise_forward(x, w, strides, pads), (x, w)


def _bwd(strides, pads, residuals, dy):
    x, w = residuals
    dx = depthwise_input_grad(dy, w, x.shape[1:3], strides, pads).astype(x.dtype)
    dw = depthwise_kernel_grad(x, dy, w.shape[:2], strides, pads).astype(w.dtype)
    return dx, dw


depthwise_conv.defvjp(_fwd, _bwd)


def use_depthwise_taps(gradient: str, layout: str, groups: int, channels: int, features: int, lowering: str) -> bool:
    """Whether a :class:`~unet_jax.layers.Conv2D` computes its convolution with
    :func:`depthwise_conv`: a depthwise convolution (``groups = channels = features > 1``)
    in NHWC with the default ``'lax'`` lowering, differentiated explicitly
    (``gradient='explicit'``, or ``'auto'`` on the CPU backend, as dense convolutions are;
    on GPU, cuDNN's depthwise kernels are fast and autodiff keeps forward mode)."""
    depthwise = groups > 1 and groups == channels == features and layout == "NHWC" and lowering == "lax"
    if not depthwise:
        return False
    return gradient == "explicit" or (gradient == "auto" and jax.default_backend() == "cpu")
