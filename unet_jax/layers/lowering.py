"""Convolution lowerings, each a piece of layer math a student can read next to its paper.

Three ways to compute the same 2-D convolution (cross-correlation, no kernel flip)

``y[n, i, j, o] = sum_{u, v, c} xpad[n, s_h i + u, s_w j + v, c] w[u, v, c, o]``

on NHWC float arrays with HWIO kernels and explicit zero padding ``((top, bottom),
(left, right))``; one group (``feature_group_count = 1``):

* :func:`conv_lax`: XLA's own convolution (``jax.lax.conv_general_dilated``), the path
  :class:`unet_jax.layers.Conv2D` takes by default.
* :func:`conv_direct`: the sum itself, one multiply-add of a shifted input channel per
  kernel tap and input channel, vectorised over output channels: for the first layer of a
  network (1 or 3 input channels), where a matrix product has almost no inner dimension.
* :func:`conv_stem`: the direct sum forward for the first layer, with a kernel gradient
  that is one matrix product of the transposed patch matrix with the output gradient
  (``(kh kw C, N Ho Wo) @ (N Ho Wo, O)``: a long inner dimension, where XLA's own kernel
  gradient of a 1-3-channel layer is a correlation with a whole-image "kernel") and
  XLA's canonical input gradient (:mod:`unet_jax.layers.conv_grad`).
* :func:`conv_im2col`: im2col + one matrix product (Chellapilla, Puri and Simard 2006,
  "High Performance Convolutional Neural Networks for Document Processing"): copy every
  receptive field into a row, then ``(N Ho Wo, kh kw C) @ (kh kw C, O)``.
* :func:`conv_winograd`: Winograd's minimal filtering ``F(m x m, 3 x 3)`` (Lavin and Gray
  2016, "Fast Algorithms for Convolutional Neural Networks"),
  ``Y = A^T [ (G g G^T) (.) (B^T d B) ] A`` per ``(m + 2) x (m + 2)`` input tile, with the
  elementwise product summed over channels as ``(m + 2)^2`` independent matrix products.

Gradients are JAX's autodiff of each forward except :func:`conv_stem`'s (for im2col the
transposes of the strided slices are pads and adds, i.e. col2im; for Winograd the
transposed transforms).

Which one is fastest depends on the shape and the machine, so the choice is made by
measurement (``python -m benchmarks.cpu_conv lowerings``, results in ``benchmarks/results``; on
the project's shared 2-core VM, one core, batch 8, forward: ``direct`` beats XLA 3-4x on the
3-channel first layer, Winograd some 16x16-32x32 layers with 64-128 channels by
1.1-1.3x, XLA's own convolution the rest; forward + backward: XLA nearly everywhere. The
im2col patch copy and the stacking of Winograd's transformed tiles are slow in XLA:CPU):
``python -m benchmarks.cpu_conv tune`` times every lowering on the 3x3 layer shapes of
a model and writes a table (:func:`table_path`), and :func:`choose_lowering`
(``Conv2D(lowering='auto')``) reads it; without a table ``'auto'`` is ``'lax'``. The
first layer's training entry times its forward and kernel gradient only. On the same VM,
two threads, batch 8: ``stem`` beats XLA 2.1-2.6x on a 1 -> 64 first layer's forward +
kernel gradient, but not on 3 -> 16; for one image at a time the table's choices make
prediction 7-9% faster (experiments/RESULTS.md, issue 22). Everything
here is a pure function of arrays (and of that table): nothing imports a layer or a model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unet_jax.layers.conv_grad import conv_explicit_grad

__all__ = [
    "LOWERINGS",
    "LOWERING_CHOICES",
    "conv_lax",
    "conv_direct",
    "conv_im2col",
    "conv_stem",
    "conv_winograd",
    "winograd_matrices",
    "lower_conv",
    "candidates",
    "resolve_lowering",
    "choose_lowering",
    "table_key",
    "table_path",
    "load_table",
    "machine_id",
    "TABLE_ENV",
    "TABLE_FORMAT",
    "PadPairs",
]

PadPairs = tuple[tuple[int, int], tuple[int, int]]

# Concrete lowerings, and the values Conv2D accepts ('auto': the tuned table's choice for
# inference, 'auto-train': its choice for forward + backward).
LOWERINGS = ("lax", "direct", "stem", "im2col", "winograd2", "winograd4")
# conv_direct (and conv_stem's forward) unroll kh kw C_in terms: measured only up to this
# many input channels.
DIRECT_MAX_CHANNELS = 8
# "onednn": bfloat16 on the CPU's matrix units through a oneDNN custom call
# (unet_jax.layers.onednn, an optional build); not in the tuned table, chosen by name.
ONEDNN = "onednn"
LOWERING_CHOICES = (*LOWERINGS, ONEDNN, "auto", "auto-train")
TABLE_ENV = "UNET_JAX_LOWERING_TABLE"
TABLE_FORMAT = "unet_jax.lowering_table"


# --------------------------------------------------------------------------------------
# XLA's convolution
# --------------------------------------------------------------------------------------
def conv_lax(
    x: jax.Array,
    w: jax.Array,
    strides: Sequence[int] = (1, 1),
    pads: PadPairs = ((0, 0), (0, 0)),
    precision: Any = None,
) -> jax.Array:
    """``(N, H, W, C) * (kh, kw, C, O) -> (N, Ho, Wo, O)`` by ``lax.conv_general_dilated``.

    ``Ho = (H + top + bottom - kh) // s_h + 1`` (likewise ``Wo``).
    """
    return jax.lax.conv_general_dilated(
        x,
        w,
        window_strides=tuple(strides),
        padding=tuple(pads),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision,
    )


def candidates(c_in: int) -> tuple[str, ...]:
    """The lowerings worth timing for ``c_in`` input channels (all but ``direct`` and
    ``stem`` above :data:`DIRECT_MAX_CHANNELS`, whose unrolled sum compiles and runs slowly
    there)."""
    return tuple(n for n in LOWERINGS if n not in ("direct", "stem") or c_in <= DIRECT_MAX_CHANNELS)


# --------------------------------------------------------------------------------------
# The direct sum
# --------------------------------------------------------------------------------------
def conv_direct(
    x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1), pads: PadPairs = ((0, 0), (0, 0))
) -> jax.Array:
    """The convolution sum as written: ``(N, H, W, C) * (kh, kw, C, O) -> (N, Ho, Wo, O)``.

    ``y = sum_{u, v, c} xpad[:, u::s_h, v::s_w, c:c+1] * w[u, v, c]``: ``kh kw C`` broadcast
    multiply-adds of one shifted input channel ``(N, Ho, Wo, 1)`` by one row of weights
    ``(1, 1, 1, O)``, which XLA fuses into one loop over the output. ``kh kw C O``
    multiplies per output pixel, like the direct convolution; no copy of the input and no
    matrix product, which wins when ``C`` is 1-3 (a GEMM with inner dimension 3 wastes
    its vector units) and loses badly for many channels (the unrolled sum grows as ``C``).
    Any kernel size and stride.
    """
    kh, kw, c, o = w.shape
    sh, sw = strides
    xp, n, ho, wo = _padded_geometry("conv_direct", x, w, strides, pads)
    y = None
    for u in range(kh):
        for v in range(kw):
            for ci in range(c):
                shifted = jax.lax.slice(
                    xp, (0, u, v, ci), (n, u + (ho - 1) * sh + 1, v + (wo - 1) * sw + 1, ci + 1), (1, sh, sw, 1)
                )
                term = shifted * w[u, v, ci].reshape(1, 1, 1, o)
                y = term if y is None else y + term
    return y


# --------------------------------------------------------------------------------------
# The first layer: the direct sum forward, the kernel gradient as one long matrix product
# --------------------------------------------------------------------------------------
def _patches_transposed(
    x: jax.Array, kernel: Sequence[int], strides: Sequence[int], pads: PadPairs, out: tuple[int, int]
) -> jax.Array:
    """The transposed patch matrix ``(kh kw C, N Ho Wo)``: row ``(u, v, c)`` holds
    ``xpad[n, s_h i + u, s_w j + v, c]`` for every output ``(n, i, j)``.

    The input is moved channels-first once (``C`` is 1-3 here, so that copy is small), after
    which every row is one strided slice; stacking them is the only other copy.
    """
    kh, kw = kernel
    sh, sw = strides
    ho, wo = out
    c, n = x.shape[3], x.shape[0]
    xp = jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), tuple(pads[0]), tuple(pads[1])))
    taps = [
        jax.lax.slice(xp, (0, 0, u, v), (c, n, u + (ho - 1) * sh + 1, v + (wo - 1) * sw + 1), (1, 1, sh, sw))
        for u in range(kh)
        for v in range(kw)
    ]
    return jnp.stack(taps).reshape(kh * kw * c, n * ho * wo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_stem(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: PadPairs) -> jax.Array:
    return conv_direct(x, w, strides, pads)


def _stem_forward(x, w, strides, pads):
    return conv_direct(x, w, strides, pads), (x, w)


def _stem_backward(strides, pads, residuals, dy):
    x, w = residuals
    kh, kw, c, o = w.shape
    patches = _patches_transposed(x, (kh, kw), strides, pads, dy.shape[1:3])
    dw = jax.lax.dot_general(patches, dy.reshape(-1, o), (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)
    _, pullback = jax.vjp(lambda x, w: conv_explicit_grad(x, w, strides, pads), x, w)
    dx, _ = pullback(dy)  # the canonical input gradient; dead code (and removed) for a network's input
    return dx, dw.reshape(kh, kw, c, o).astype(w.dtype)


_conv_stem.defvjp(_stem_forward, _stem_backward)


def conv_stem(
    x: jax.Array, w: jax.Array, strides: Sequence[int] = (1, 1), pads: PadPairs = ((0, 0), (0, 0))
) -> jax.Array:
    """The first layer's convolution: ``(N, H, W, C) * (kh, kw, C, O) -> (N, Ho, Wo, O)``, ``C`` small.

    * Forward: :func:`conv_direct`, the sum as written.
    * Kernel gradient: ``dw[u, v, c, o] = sum_{n, i, j} xpad[n, s_h i + u, s_w j + v, c]
      dy[n, i, j, o]``, i.e. ``P^T dY`` with ``P^T`` the ``(kh kw C, N Ho Wo)`` transposed
      patch matrix and ``dY`` the output gradient as ``(N Ho Wo, O)``: one matrix product
      whose inner dimension is every output pixel. (Autodiff of the direct sum would make
      ``kh kw C`` separate reductions, each reading all of ``dY``; XLA's own kernel
      gradient is a correlation of the image with a whole-image "kernel".)
    * Input gradient: XLA's convolution in the canonical layout
      (:func:`unet_jax.layers.conv_grad.conv_explicit_grad`). A network's first layer
      never needs it: under ``jit`` it is dead code.

    Reverse mode only (a ``custom_vjp``). Any kernel size and stride.
    """
    _padded_geometry("conv_stem", x, w, strides, pads)  # the same checks and messages as conv_direct
    return _conv_stem(x, w, tuple(int(s) for s in strides), tuple(tuple(int(p) for p in pair) for pair in pads))


# --------------------------------------------------------------------------------------
# im2col + GEMM
# --------------------------------------------------------------------------------------
def _pad_nhwc(x: jax.Array, pads: PadPairs) -> jax.Array:
    return jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))


def _out_size(padded: int, k: int, s: int, what: str) -> int:
    if padded < k:
        raise ValueError(
            f"kernel {what} {k} is larger than the padded input {padded}; expected kernel {what} <= {padded}"
        )
    return (padded - k) // s + 1


def _padded_geometry(
    name: str, x: jax.Array, w: jax.Array, strides: Sequence[int], pads: PadPairs
) -> tuple[jax.Array, int, int, int]:
    """The padded input of a slicing lowering and ``(N, H_out, W_out)``, after checking that
    the kernel ``(kh, kw, C, O)`` reads ``x``'s ``C`` channels and fits the padded input."""
    kh, kw, c, _ = w.shape
    if x.shape[-1] != c:
        raise ValueError(f"{name}: input has {x.shape[-1]} channels, kernel {tuple(w.shape)} expects {c}")
    xp = _pad_nhwc(x, pads)
    return (
        xp,
        x.shape[0],
        _out_size(xp.shape[1], kh, strides[0], "height"),
        _out_size(xp.shape[2], kw, strides[1], "width"),
    )


def conv_im2col(
    x: jax.Array,
    w: jax.Array,
    strides: Sequence[int] = (1, 1),
    pads: PadPairs = ((0, 0), (0, 0)),
    precision: Any = None,
) -> jax.Array:
    """Convolution as im2col then one GEMM: ``(N, H, W, C) * (kh, kw, C, O) -> (N, Ho, Wo, O)``.

    1. Pad, then take ``kh * kw`` strided slices ``xpad[:, u::s_h, v::s_w, :]`` (each
       ``(N, Ho, Wo, C)``), one per kernel tap ``(u, v)``.
    2. Concatenate them on the channel axis and flatten: the patch matrix ``P`` of shape
       ``(N Ho Wo, kh kw C)``, row ``(n, i, j)`` holding the receptive field of output
       ``(i, j)`` in ``(u, v, c)`` order.
    3. ``Y = P @ W`` with ``W = w.reshape(kh kw C, O)`` (HWIO is already ``(u, v, c)``-major).

    Same multiply count as the direct sum, ``kh kw C O`` per output pixel, but as one large
    matrix product; the price is ``kh kw`` copies of the input. Any kernel size and stride.
    """
    kh, kw, c, o = w.shape
    sh, sw = strides
    xp, n, ho, wo = _padded_geometry("conv_im2col", x, w, strides, pads)
    taps = [
        jax.lax.slice(xp, (0, u, v, 0), (n, u + (ho - 1) * sh + 1, v + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
        for u in range(kh)
        for v in range(kw)
    ]
    patches = jnp.concatenate(taps, axis=-1).reshape(n * ho * wo, kh * kw * c)
    y = jax.lax.dot_general(patches, w.reshape(kh * kw * c, o), (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(n, ho, wo, o)


# --------------------------------------------------------------------------------------
# Winograd F(m x m, 3 x 3)
# --------------------------------------------------------------------------------------
# Lavin and Gray (2016), section 4.1: F(2, 3) from the interpolation points 0, 1, -1, inf.
_F23 = dict(
    BT=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    G=((1, 0, 0), (1 / 2, 1 / 2, 1 / 2), (1 / 2, -1 / 2, 1 / 2), (0, 0, 1)),
    AT=((1, 1, 1, 0), (0, 1, -1, -1)),
)
# Lavin and Gray (2016), section 4.2 (as generated by wincnn): F(4, 3) from the points
# 0, 1, -1, 2, -2, inf. Larger points make larger entries, hence more float32 rounding.
_F43 = dict(
    BT=(
        (4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1),
    ),
    G=(
        (1 / 4, 0, 0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0, 0, 1),
    ),
    AT=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
)
_WINOGRAD = {2: _F23, 4: _F43}


def winograd_matrices(m: int) -> dict[str, np.ndarray]:
    """``B^T`` ``(m+2, m+2)``, ``G`` ``(m+2, 3)`` and ``A^T`` ``(m, m+2)`` of ``F(m, 3)`` (float64).

    In one dimension ``y = A^T [(G g) (.) (B^T d)]`` is the correlation
    ``y[i] = sum_k d[i + k] g[k]`` of an ``m + 2`` input tile ``d`` with a 3-tap filter
    ``g``, with ``m + 2`` multiplies instead of ``3 m``; nesting it gives the 2-D form.
    """
    if m not in _WINOGRAD:
        raise ValueError(f"Winograd output tile m must be one of {sorted(_WINOGRAD)}, got {m!r}")
    return {k: np.array(v, dtype=np.float64) for k, v in _WINOGRAD[m].items()}


def _combine(mat: np.ndarray, terms: Sequence[jax.Array]) -> list[jax.Array]:
    """``out[i] = sum_k mat[i, k] terms[k]``, unrolled at trace time.

    The transform matrices are small and mostly 0 and +-1: skipping zeros and turning +-1
    into adds/subtracts leaves XLA one fused elementwise pass instead of a tiny matmul.
    """
    out = []
    for row in mat:
        acc = None
        for coef, term in zip(row, terms):
            if coef == 0:
                continue
            if acc is None:
                acc = term if coef == 1 else (-term if coef == -1 else float(coef) * term)
            elif coef in (1, -1):
                acc = acc + term if coef == 1 else acc - term
            else:
                acc = acc + float(coef) * term
        out.append(acc)
    return out


def _input_transform(xp: jax.Array, bt: np.ndarray, m: int, tiles: tuple[int, int]) -> jax.Array:
    """``V = B^T d B`` for every tile: ``(N, Hp, Wp, C) -> ((m+2)^2, N th tw, C)``.

    Tile ``(p, q)`` is ``d = xpad[:, m p : m p + m + 2, m q : m q + m + 2]``. Rows first: the
    ``a``-th row of every tile is the strided slice ``xpad[:, a::m]``, so ``B^T d`` for all
    tiles at once is :func:`_combine` of ``m + 2`` such slices; then the columns likewise.
    """
    th, tw = tiles
    n, _, wp, c = xp.shape
    a = m + 2
    rows = [jax.lax.slice(xp, (0, k, 0, 0), (n, k + (th - 1) * m + 1, wp, c), (1, m, 1, 1)) for k in range(a)]
    v = []
    for row in _combine(bt, rows):  # (N, th, Wp, C) each
        cols = [jax.lax.slice(row, (0, 0, k, 0), (n, th, k + (tw - 1) * m + 1, c), (1, 1, m, 1)) for k in range(a)]
        v.extend(_combine(bt, cols))  # (N, th, tw, C) each
    return jnp.stack(v).reshape(a * a, n * th * tw, c)


def _filter_transform(w: jax.Array, g: np.ndarray) -> jax.Array:
    """``U = G g G^T`` per (in, out) channel pair: ``(3, 3, C, O) -> ((m+2)^2, C, O)``."""
    gm = jnp.asarray(g, w.dtype)
    u = jnp.einsum("xu,uvco,yv->xyco", gm, w, gm, precision=jax.lax.Precision.HIGHEST)
    return u.reshape(g.shape[0] ** 2, *w.shape[2:])


def _output_transform(mm: jax.Array, at: np.ndarray, shape: tuple[int, int, int]) -> jax.Array:
    """``Y = A^T M A`` per tile, tiles put back in place: ``((m+2)^2, N th tw, O) -> (N, th m, tw m, O)``."""
    n, th, tw = shape
    m, a = at.shape
    o = mm.shape[-1]
    mm = mm.reshape(a, a, n, th, tw, o)
    half = _combine(at, [mm[k] for k in range(a)])  # A^T M: m arrays (a, N, th, tw, O)
    y = [_combine(at, [h[k] for k in range(a)]) for h in half]  # (A^T M) A: m x m arrays
    y = jnp.stack([jnp.stack(row) for row in y])  # (m, m, N, th, tw, O)
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * m, tw * m, o)


def conv_winograd(
    x: jax.Array, w: jax.Array, pads: PadPairs = ((0, 0), (0, 0)), m: int = 2, precision: Any = None
) -> jax.Array:
    """3x3, stride-1 convolution by Winograd's ``F(m x m, 3 x 3)``: ``(N, H, W, C) * (3, 3, C, O) -> (N, Ho, Wo, O)``.

    Lavin and Gray (2016), equation (8): for each ``(m + 2) x (m + 2)`` input tile ``d`` and
    each (input, output) channel pair with filter ``g``,

    ``Y = A^T [ U (.) V ] A``,  ``U = G g G^T``,  ``V = B^T d B``

    and, since the transforms are linear, the sum over input channels moves inside:
    ``M[xi, nu] = sum_c U[xi, nu, c, o] V[xi, nu, tile, c]``, i.e. for each of the
    ``(m + 2)^2`` transform positions ``(xi, nu)`` one matrix product ``(tiles, C) @ (C, O)``
    (a batched ``dot_general``), then ``Y = A^T M A``.

    Multiplies per output pixel per (in, out) pair: ``(m + 2)^2 / m^2`` instead of 9:
    ``F(2, 3)``: 16 per 4 outputs (2.25x fewer than 36); ``F(4, 3)``: 36 per 16 outputs
    (4x fewer than 144). The transforms cost additions proportional to ``C`` and ``O``,
    not ``C O``, so the saving shows for many channels.

    Tiles advance by ``m``; the padded input is padded further at the bottom/right so that
    ``ceil(Ho / m)`` tiles cover every output (any size works), and the extra outputs are
    cropped. Output ``Ho = H + top + bottom - 2``.

    Raises:
      ValueError: if the kernel is not 3x3, ``m`` is not 2 or 4, or the padded input is
        smaller than the kernel.
    """
    if tuple(w.shape[:2]) != (3, 3):
        raise ValueError(f"conv_winograd: only 3x3 kernels, got kernel shape {tuple(w.shape)}")
    mats = winograd_matrices(m)
    if x.shape[-1] != w.shape[2]:
        raise ValueError(
            f"conv_winograd: input has {x.shape[-1]} channels, kernel {tuple(w.shape)} expects {w.shape[2]}"
        )
    xp = _pad_nhwc(x, pads)
    ho, wo = _out_size(xp.shape[1], 3, 1, "height"), _out_size(xp.shape[2], 3, 1, "width")
    th, tw = math.ceil(ho / m), math.ceil(wo / m)
    # Whole tiles only: th tiles need th m + 2 rows.
    xp = jnp.pad(xp, ((0, 0), (0, th * m + 2 - xp.shape[1]), (0, tw * m + 2 - xp.shape[2]), (0, 0)))
    v = _input_transform(xp, mats["BT"], m, (th, tw))  # (a^2, T, C)
    u = _filter_transform(w, mats["G"])  # (a^2, C, O)
    mm = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)  # (a^2, T, O)
    y = _output_transform(mm, mats["AT"], (x.shape[0], th, tw))
    return y[:, :ho, :wo]


# --------------------------------------------------------------------------------------
# One entry point, and the choice
# --------------------------------------------------------------------------------------
def _winograd_fits(kernel: Sequence[int], strides: Sequence[int], groups: int) -> str | None:
    """Why Winograd cannot compute this convolution, or ``None`` if it can."""
    if tuple(kernel) != (3, 3):
        return f"kernel {tuple(kernel)} (expected (3, 3))"
    if tuple(strides) != (1, 1):
        return f"strides {tuple(strides)} (expected (1, 1))"
    if groups != 1:
        return f"feature_group_count {groups} (expected 1)"
    return None


def resolve_lowering(
    lowering: str,
    *,
    kernel: Sequence[int],
    strides: Sequence[int],
    groups: int = 1,
    shape: tuple[int, int, int, int] | None = None,
    out_features: int | None = None,
    pads: PadPairs | None = None,
) -> str:
    """The concrete lowering (one of :data:`LOWERINGS`) that computes this convolution.

    ``'auto'`` / ``'auto-train'`` ask :func:`choose_lowering` (inference / forward +
    backward entry of the tuned table; ``shape`` is the NHWC input shape, needed for the
    lookup) and fall back to ``'lax'`` where the choice cannot apply. A forced lowering
    that cannot compute the convolution raises.

    Raises:
      ValueError: ``lowering`` is not in :data:`LOWERING_CHOICES`; a non-lax lowering with
        ``groups > 1``; Winograd on a kernel other than 3x3 or a stride other than 1.
    """
    if lowering not in LOWERING_CHOICES:
        raise ValueError(f"lowering must be one of {LOWERING_CHOICES}, got {lowering!r}")
    if lowering.startswith("auto"):
        # The table holds 3x3 stride-1 ungrouped layers only; everything else stays on lax.
        if shape is None or out_features is None or _winograd_fits(kernel, strides, groups):
            return "lax"
        choice = choose_lowering(
            shape[1],
            shape[2],
            shape[3],
            out_features,
            batch=shape[0],
            mode="train" if lowering == "auto-train" else "infer",
            pads=pads,
        )
        return choice if choice in LOWERINGS else "lax"
    if lowering != "lax" and groups != 1:
        raise ValueError(
            f"lowering {lowering!r} computes ungrouped convolutions only, got "
            f"feature_group_count {groups}; use lowering='lax' or 'auto'"
        )
    if lowering.startswith("winograd"):
        reason = _winograd_fits(kernel, strides, groups)
        if reason:
            raise ValueError(
                f"lowering {lowering!r} needs a 3x3 kernel and stride 1, got {reason}; "
                f"use lowering='lax', 'direct', 'im2col' or 'auto'"
            )
    return lowering


def lower_conv(
    lowering: str, x: jax.Array, w: jax.Array, strides: Sequence[int], pads: PadPairs, precision: Any = None
) -> jax.Array:
    """NHWC convolution by a concrete lowering, one of :data:`LOWERINGS` (no ``'auto'``:
    see :func:`resolve_lowering`)."""
    if lowering == "lax":
        return conv_lax(x, w, strides, pads, precision)
    if lowering == "direct":
        return conv_direct(x, w, strides, pads)
    if lowering == "stem":
        return conv_stem(x, w, strides, pads)
    if lowering == "im2col":
        return conv_im2col(x, w, strides, pads, precision)
    if lowering in ("winograd2", "winograd4"):
        if tuple(strides) != (1, 1):
            raise ValueError(f"lowering {lowering!r} needs stride 1, got strides {tuple(strides)}")
        return conv_winograd(x, w, pads, m=int(lowering[-1]), precision=precision)
    raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")


# --------------------------------------------------------------------------------------
# The tuned table
# --------------------------------------------------------------------------------------
def _batch_bucket(batch: int) -> int:
    """Batches timed alike share an entry: the largest power of two ``<= batch``."""
    return 1 << (max(int(batch), 1).bit_length() - 1)


def table_key(
    h: int, w: int, c_in: int, c_out: int, batch: int, mode: str, pads: PadPairs | None = ((1, 1), (1, 1))
) -> str:
    """``'HxW:Cin->Cout:b<bucket>:<infer|train>:p<t,b,l,r>'``, one 3x3 stride-1 layer shape."""
    if mode not in ("infer", "train"):
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    (t, b), (lft, r) = pads if pads is not None else ((1, 1), (1, 1))
    return f"{h}x{w}:{c_in}->{c_out}:b{_batch_bucket(batch)}:{mode}:p{t},{b},{lft},{r}"


def machine_id() -> str:
    """A short hash of the CPU model: a table measured on one machine is not another's."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return hashlib.sha1(f"{model}|{platform.machine()}".encode()).hexdigest()[:12]


def table_path() -> Path:
    """``$UNET_JAX_LOWERING_TABLE``, else ``$XDG_CACHE_HOME/unet_jax/lowering-<cpu hash>.json``
    (``~/.cache`` without XDG)."""
    if os.environ.get(TABLE_ENV):
        return Path(os.environ[TABLE_ENV])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "unet_jax" / f"lowering-{machine_id()}.json"


@functools.lru_cache(maxsize=8)
def _read_table(path: str, mtime_ns: int) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{path}: not a lowering table ({err}); expected the JSON that "
            f"`python -m benchmarks.cpu_conv tune` writes (delete it to tune again)"
        ) from None
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: not a lowering table (expected format {TABLE_FORMAT!r})")
    return data


def load_table(path: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """The table at ``path`` (default :func:`table_path`), or ``None`` if there is none.

    Read once per file version (keyed by modification time), so tracing many layers costs
    one read.
    """
    path = Path(path) if path is not None else table_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    return _read_table(str(path), mtime)


def choose_lowering(
    h: int,
    w: int,
    c_in: int,
    c_out: int,
    *,
    batch: int = 8,
    mode: str = "infer",
    pads: PadPairs | None = ((1, 1), (1, 1)),
    table: dict[str, Any] | None = None,
) -> str:
    """The measured-fastest lowering for a 3x3 stride-1 layer on an ``(N, h, w, c_in)`` input.

    Looks the shape up in ``table`` (default: :func:`load_table`): the entry of the same
    batch bucket, else of the nearest bucket measured for this shape and mode. ``'lax'``
    when there is no table or no entry for the shape.
    """
    table = load_table() if table is None else table
    if not table:
        return "lax"
    entries = table.get("entries", {})
    key = table_key(h, w, c_in, c_out, batch, mode, pads)
    if key in entries:
        return entries[key]["best"]
    prefix, _, rest = key.partition(":b")
    suffix = rest.split(":", 1)[1]
    near = [
        (abs(math.log2(int(k[len(prefix) + 2 :].split(":", 1)[0]) / _batch_bucket(batch))), k)
        for k in entries
        if k.startswith(prefix + ":b") and k.endswith(":" + suffix)
    ]
    return entries[min(near)[1]]["best"] if near else "lax"
