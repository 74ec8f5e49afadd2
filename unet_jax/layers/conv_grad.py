"""The convolution's two gradients written out as convolutions in the canonical layout.

Why this module exists: XLA:CPU runs a convolution with its fast (Eigen) kernels only when
the convolution is *canonical*: input batch-first and features-last (NHWC), kernel HWIO,
output NHWC. JAX's autodiff expresses the gradients of a convolution as convolutions whose
dimension labels are not canonical: the input gradient reads the kernel with its in/out
axes swapped (``01oi``), the kernel gradient exchanges batch and features (``f01b_i01o ->
01bf``). XLA:CPU's ``ConvCanonicalization`` pass rewrites such convolutions with explicit
transposes, but only in a program's top-level (entry) computation. Inside a ``lax.scan`` (a
while loop) they stay as they are and run on a naive loop nest: a scanned training step of
the seed U-Net was 25x slower than the same step dispatched alone (issue 12; ``python
benchmarks/throughput.py --frameworks jax --modes train --presets seed --size 128 --batches
16 --dtypes float32``, rows ``train_scan`` and ``train_single``; before/after in
experiments/RESULTS.md; ``cpu_levers.py model``'s ``xla_grad`` variant switches it back). :func:`conv_explicit_grad`
gives JAX the gradients already canonical, so they are fast wherever they sit.

The gradients (one spatial axis; stride ``s``, padding ``(lo, hi)``, input dilation ``d``
as in a transposed convolution, kernel size ``k``; ``x * w`` the forward correlation):

* input gradient: the output gradient dilated by ``s`` (``s - 1`` zeros between rows),
  padded by ``(k - 1 - lo, ...)`` and correlated with stride ``d`` with the spatially
  flipped kernel whose in/out axes are swapped:
  ``dx = dilate_s(dy) * flip(w)^T``;
* kernel gradient: ``dw[u, v, c, o] = sum_{n, i, j} xpad[n, s i + u, s j + v, c] dy[n, i,
  j, o]``, a correlation of the input (its channels as the batch, its batch as the
  features) with the output gradient as the kernel (batch as the kernel's input axis,
  kernel dilation ``s``). With a dilated input the roles swap: ``dw[k - 1 - u] = sum_p
  x[p] dypad[u + d p]``, the output gradient correlated with the input as a
  ``d``-dilated kernel.

Both equal JAX's autodiff exactly (tests/test_conv_grad.py, hypothesis over sizes, strides,
dilations and asymmetric padding). The cost: forward-mode differentiation (``jax.jvp``,
``jax.jacfwd``, ``jax.hessian``) cannot pass a ``custom_vjp``; the layers therefore use it
only where it pays (``gradient='auto'``: on the CPU backend) and keep JAX's own derivative
with ``gradient='xla'``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["GRADIENTS", "conv_explicit_grad", "conv_transpose_vjp", "interleave", "use_explicit_grad"]

PadPairs = tuple[tuple[int, int], tuple[int, int]]
# How a layer differentiates its convolution: "xla" JAX's autodiff (forward and reverse
# mode), "explicit" conv_explicit_grad (reverse mode only), "auto" explicit on the CPU.
GRADIENTS = ("auto", "xla", "explicit")
_NHWC = ("NHWC", "HWIO", "NHWC")


def use_explicit_grad(gradient: str, layout: str, groups: int, layer: str) -> bool:
    """Whether a layer's convolution takes :func:`conv_explicit_grad`: ``gradient`` is
    ``'explicit'``, or ``'auto'`` on the CPU backend (the only one whose loops need it; on
    GPU the extra transposes would cost memory traffic). Only NHWC without groups is
    written out; ``'explicit'`` with anything else is an error naming the layer."""
    if gradient not in GRADIENTS:
        raise ValueError(f"{layer}: gradient must be one of {GRADIENTS}, got {gradient!r}")
    supported = layout == "NHWC" and groups == 1
    if gradient == "explicit" and not supported:
        raise ValueError(
            f"{layer}: gradient='explicit' needs layout 'NHWC' and feature_group_count 1, got "
            f"layout {layout!r} and {groups} group(s); use gradient='xla' or 'auto'"
        )
    if gradient == "auto":
        return supported and jax.default_backend() == "cpu"
    return gradient == "explicit"


def _dilated(n: int, d: int) -> int:
    """Length of ``n`` samples with ``d - 1`` zeros between neighbours."""
    return 0 if n == 0 else 1 + d * (n - 1)


def _input_gradient_pads(n: int, m: int, k: int, s: int, d: int, lo: int) -> tuple[int, int]:
    """Padding of the ``s``-dilated output gradient (``m`` rows) whose correlation with the
    flipped kernel has the ``d``-dilated input's length, then sampled every ``d``."""
    before = k - 1 - lo
    return before, _dilated(n, d) + k - 1 - _dilated(m, s) - before


def _kernel_gradient_pads(n: int, m: int, k: int, s: int, lo: int) -> tuple[int, int]:
    """Padding of the input whose correlation with the ``s``-dilated output gradient (``m``
    rows) has ``k`` taps."""
    return lo, _dilated(m, s) - n + k - 1 - lo


def _kernel_gradient(
    x: jax.Array,
    w: jax.Array,
    dy: jax.Array,
    strides: tuple[int, int],
    pads: PadPairs,
    lhs_dilation: tuple[int, int],
    precision: Any,
) -> jax.Array:
    """``dw`` as a canonical correlation, batch and channels exchanged (module docstring).

    A dilated input (a transposed convolution) would put the dilation on the correlation's
    input, which XLA rewrites into a non-canonical form; there the roles swap: the output
    gradient is correlated with the input as a ``d``-dilated kernel, padded by ``k - 1 -
    p``, which yields the kernel's taps in reverse order.
    """
    k = w.shape[:2]
    if lhs_dilation == (1, 1):
        geometry = zip(x.shape[1:3], dy.shape[1:3], k, strides, (lo for lo, _ in pads))
        dw = jax.lax.conv_general_dilated(
            jnp.transpose(x, (3, 1, 2, 0)),
            jnp.transpose(dy, (1, 2, 0, 3)),
            (1, 1),
            [_kernel_gradient_pads(*g) for g in geometry],
            rhs_dilation=strides,
            dimension_numbers=_NHWC,
            precision=precision,
        )
        return jnp.transpose(dw, (1, 2, 0, 3))  # (C, kh, kw, F) -> (kh, kw, C, F)
    dw = jax.lax.conv_general_dilated(
        jnp.transpose(dy, (3, 1, 2, 0)),
        jnp.transpose(x, (1, 2, 0, 3)),
        (1, 1),
        [(kk - 1 - lo, kk - 1 - hi) for kk, (lo, hi) in zip(k, pads)],
        rhs_dilation=lhs_dilation,
        dimension_numbers=_NHWC,
        precision=precision,
    )
    return jnp.transpose(jnp.flip(dw, (1, 2)), (1, 2, 3, 0))  # (F, kh, kw, C) -> (kh, kw, C, F)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_explicit_grad(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    pads: PadPairs,
    lhs_dilation: tuple[int, int] = (1, 1),
    precision: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated(x, w, strides, pads, lhs_dilation)`` in NHWC/HWIO (no
    groups, no kernel dilation) whose gradients are canonical convolutions (module
    docstring).

    x: (N, H, W, C); w: (kh, kw, C, F), same dtype; pads ``((top, bottom), (left, right))``
    as ints (negative crops); ``lhs_dilation > 1`` (a transposed convolution) only with
    unit strides. Returns (N, H_out, W_out, F). Reverse mode only.
    """
    if lhs_dilation != (1, 1) and strides != (1, 1):
        raise ValueError(f"conv_explicit_grad: input dilation {lhs_dilation} needs unit strides, got {strides}")
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, lhs_dilation=lhs_dilation, dimension_numbers=_NHWC, precision=precision
    )


def _forward(x, w, strides, pads, lhs_dilation, precision):
    return conv_explicit_grad(x, w, strides, pads, lhs_dilation, precision), (x, w)


def _backward(strides, pads, lhs_dilation, precision, residuals, dy):
    x, w = residuals
    geometry = zip(x.shape[1:3], dy.shape[1:3], w.shape[:2], strides, lhs_dilation, (lo for lo, _ in pads))
    flipped = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)  # (kh, kw, F, C)
    dx = jax.lax.conv_general_dilated(
        dy,
        flipped,
        lhs_dilation,
        [_input_gradient_pads(*g) for g in geometry],
        lhs_dilation=strides,
        dimension_numbers=_NHWC,
        precision=precision,
    )
    dw = _kernel_gradient(x, w, dy, strides, pads, lhs_dilation, precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


conv_explicit_grad.defvjp(_forward, _backward)


def interleave(x: jax.Array, strides: tuple[int, int], pads: PadPairs, layout: str = "NHWC") -> jax.Array:
    """``x`` with ``s - 1`` zeros between neighbouring pixels and ``pads`` (negative: crops)
    at its edges, by one ``lax.pad`` with interior padding: the zero-inserted input of a
    transposed convolution, materialised (equinox PR #1259's formulation)."""
    spatial = tuple((lo, hi, s - 1) for (lo, hi), s in zip(pads, strides))
    none = ((0, 0, 0),)
    config = none + spatial + none if layout == "NHWC" else none + none + spatial
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv_transpose_vjp(
    x: jax.Array,
    w: jax.Array,
    strides: tuple[int, int],
    pads: PadPairs,
    precision: Any = None,
    layout: str = "NHWC",
    explicit: bool = False,
) -> jax.Array:
    """A transposed convolution with its own VJP: ``lax.conv_general_dilated(x, w, 1, pads,
    lhs_dilation=strides)`` (``w`` the already flipped ``(kh, kw, C, F)`` kernel, ``pads``
    those of the zero-inserted input) whose kernel gradient is a canonical convolution.

    Autodiff of the lhs-dilated convolution gives a kernel gradient that keeps the lhs
    dilation, which XLA's GPU rewriter cannot map to cuDNN's backward-filter call (issue
    31: jax-ml/jax#31662, openxla/xla#34273). Here the kernel gradient is that of a stride-1
    convolution of the interleaved input (:func:`interleave`): JAX's own (``explicit``
    False) or the written-out canonical form of :func:`_kernel_gradient` (``explicit``
    True, NHWC: XLA:CPU's fast path inside loops). The input gradient is one strided
    convolution of the output gradient, as in :func:`conv_explicit_grad`. The forward pass
    multiplies no inserted zeros. Reverse mode only.
    """
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), pads, lhs_dilation=strides, dimension_numbers=(layout, "HWIO", layout), precision=precision
    )


def _transpose_forward(x, w, strides, pads, precision, layout, explicit):
    return conv_transpose_vjp(x, w, strides, pads, precision, layout, explicit), (x, w)


def _transpose_backward(strides, pads, precision, layout, explicit, residuals, dy):
    x, w = residuals
    axes = (1, 2) if layout == "NHWC" else (2, 3)
    dims = (layout, "HWIO", layout)
    geometry = zip(
        (x.shape[a] for a in axes), (dy.shape[a] for a in axes), w.shape[:2], strides, (lo for lo, _ in pads)
    )
    dx = jax.lax.conv_general_dilated(
        dy,
        jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3),
        strides,
        [_input_gradient_pads(n, m, k, 1, s, lo) for n, m, k, s, lo in geometry],
        dimension_numbers=dims,
        precision=precision,
    )
    z = interleave(x, strides, ((0, 0), (0, 0)), layout)
    if explicit:
        dw = _kernel_gradient(z, w, dy, (1, 1), pads, (1, 1), precision)
    else:
        conv = lambda k: jax.lax.conv_general_dilated(  # noqa: E731
            z, k, (1, 1), pads, dimension_numbers=dims, precision=precision
        )
        dw = jax.vjp(conv, w)[1](dy)[0]
    return dx.astype(x.dtype), dw.astype(w.dtype)


conv_transpose_vjp.defvjp(_transpose_forward, _transpose_backward)
