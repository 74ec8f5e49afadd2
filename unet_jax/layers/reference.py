"""Literal NumPy versions of the report's layer equations, for tests and teaching only.

Plain Python loops over every output position: slow, small sizes only, and written to be
read next to the equations rather than to be fast. Arrays are ``(H, W)`` (one channel) or
``(H, W, C)``; no batch axis. Kernels are ``(kh, kw)`` or ``(kh, kw, C_in, C_out)``.
Padding is ``((top, bottom), (left, right))`` of zeros (``-inf`` for pooling).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "pad",
    "conv2d",
    "maxpool2d",
    "insert_zeros",
    "conv_transpose2d",
    "conv_transpose2d_scatter",
    "conv_transpose2d_grads",
]

Pads = tuple[tuple[int, int], tuple[int, int]]


def _as_hwc(x: np.ndarray) -> tuple[np.ndarray, bool]:
    x = np.asarray(x, dtype=np.float64)
    return (x[:, :, None], True) if x.ndim == 2 else (x, False)


def _as_kernel(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, dtype=np.float64)
    return w[:, :, None, None] if w.ndim == 2 else w


def pad(x: np.ndarray, pads: Pads, value: float = 0.0) -> np.ndarray:
    """``x`` of shape ``(H, W, C)`` surrounded by ``value``: ``(H + top + bottom, W + left + right, C)``."""
    (top, bottom), (left, right) = pads
    out = np.full((x.shape[0] + top + bottom, x.shape[1] + left + right, x.shape[2]), value)
    out[top : top + x.shape[0], left : left + x.shape[1]] = x
    return out


def conv2d(
    x: np.ndarray,
    w: np.ndarray,
    stride: int = 1,
    pads: Pads = ((0, 0), (0, 0)),
    bias: np.ndarray | None = None,
    groups: int = 1,
) -> np.ndarray:
    """The report's 2-D convolution: the sum over the receptive field,

    ``Y[i, j, o] = b[o] + sum_{c} sum_{u=0}^{kh-1} sum_{v=0}^{kw-1} X[s i + u, s j + v, c] K[u, v, c, o]``

    over the zero-padded input ``X``, for ``i < floor((H + 2p - kh) / s) + 1`` (and the same
    for ``j``). With one channel and one kernel it is the single-channel equation
    ``Y[i, j] = sum_{u, v} X[s i + u, s j + v] K[u, v]``. As in every deep-learning
    framework, the kernel is not flipped (cross-correlation).

    Grouped (``groups = G``; depthwise when ``G = C_in``): the kernel is ``(kh, kw, C_in /
    G, C_out)`` and output channel ``o`` sums over its group's input channels only,
    ``X[., ., g (C_in / G) + c]`` with ``g = o // (C_out / G)`` and ``c < C_in / G``.
    """
    x, squeeze = _as_hwc(x)
    w = _as_kernel(w)
    kh, kw, c_in, c_out = w.shape
    if groups < 1 or x.shape[2] % groups or c_out % groups:
        raise ValueError(
            f"conv2d: groups {groups} must divide the input channels {x.shape[2]} and the output channels {c_out}"
        )
    if x.shape[2] != c_in * groups:
        # A ValueError, not an assert: asserts vanish under ``python -O``.
        raise ValueError(
            f"conv2d: input has {x.shape[2]} channels (shape {x.shape}), but the kernel "
            f"of shape {w.shape} expects C_in = {c_in * groups} ({groups} group(s))"
        )
    xp = pad(x, pads)
    out_h = (xp.shape[0] - kh) // stride + 1
    out_w = (xp.shape[1] - kw) // stride + 1
    y = np.zeros((out_h, out_w, c_out))
    for i in range(out_h):
        for j in range(out_w):
            for o in range(c_out):
                total = 0.0 if bias is None else float(bias[o])
                first = (o // (c_out // groups)) * c_in  # the group's first input channel
                for c in range(c_in):
                    for u in range(kh):
                        for v in range(kw):
                            total += xp[stride * i + u, stride * j + v, first + c] * w[u, v, c, o]
                y[i, j, o] = total
    return y[:, :, 0] if squeeze and c_out == 1 else y


def maxpool2d(x: np.ndarray, window: int = 2, stride: int | None = None, pads: Pads = ((0, 0), (0, 0))) -> np.ndarray:
    """The report's max pooling: ``Y[i, j, c] = max_{u < k, v < k} X[s i + u, s j + v, c]``,
    over the input padded with ``-inf``, per channel."""
    x, squeeze = _as_hwc(x)
    stride = window if stride is None else stride
    xp = pad(x, pads, value=-np.inf)
    out_h = (xp.shape[0] - window) // stride + 1
    out_w = (xp.shape[1] - window) // stride + 1
    y = np.empty((out_h, out_w, x.shape[2]))
    for i in range(out_h):
        for j in range(out_w):
            for c in range(x.shape[2]):
                best = -np.inf
                for u in range(window):
                    for v in range(window):
                        best = max(best, xp[stride * i + u, stride * j + v, c])
                y[i, j, c] = best
    return y[:, :, 0] if squeeze else y


def insert_zeros(x: np.ndarray, stride: int) -> np.ndarray:
    """``s - 1`` zeros between neighbouring pixels: ``(H, W, C) -> (s (H - 1) + 1, s (W - 1) + 1, C)``."""
    x, _ = _as_hwc(x)
    out = np.zeros((stride * (x.shape[0] - 1) + 1, stride * (x.shape[1] - 1) + 1, x.shape[2]))
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[stride * i, stride * j] = x[i, j]
    return out


def conv_transpose2d(
    x: np.ndarray,
    w: np.ndarray,
    stride: int = 1,
    pads: Pads = ((0, 0), (0, 0)),
    output_padding: int = 0,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """Transposed convolution as the report describes it: zero insertion, then convolution.

    The report's equation [16] for the transposed convolution is garbled, so this is the
    standard definition (PyTorch's ``ConvTranspose2d``, the adjoint of :func:`conv2d`):

    1. insert ``s - 1`` zeros between input pixels (:func:`insert_zeros`);
    2. pad by ``k - 1 - p`` on each side (plus ``output_padding`` at the bottom/right);
    3. convolve with stride 1 with the kernel rotated by 180 degrees.

    Output length ``s (n - 1) + k - 2p + output_padding``. ``w`` is ``(kh, kw, C_in, C_out)``.
    :func:`conv_transpose2d_scatter` computes the same by the scatter definition.
    """
    w = _as_kernel(w)
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = pads
    z = insert_zeros(x, stride)
    zp = pad(z, ((kh - 1 - pt, kh - 1 - pb + output_padding), (kw - 1 - pl, kw - 1 - pr + output_padding)))
    y = conv2d(zp, w[::-1, ::-1], stride=1, bias=bias)
    return y


def conv_transpose2d_scatter(
    x: np.ndarray, w: np.ndarray, stride: int = 1, pads: Pads = ((0, 0), (0, 0)), output_padding: int = 0
) -> np.ndarray:
    """Transposed convolution by its scatter definition: every input pixel adds a scaled
    copy of the kernel to the output, ``Y[s i + u - p, s j + v - p, o] += X[i, j, c] K[u, v, c, o]``."""
    x, _ = _as_hwc(x)
    w = _as_kernel(w)
    kh, kw, c_in, c_out = w.shape
    (pt, pb), (pl, pr) = pads
    full = np.zeros(
        (stride * (x.shape[0] - 1) + kh + output_padding, stride * (x.shape[1] - 1) + kw + output_padding, c_out)
    )
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            for c in range(c_in):
                for u in range(kh):
                    for v in range(kw):
                        full[stride * i + u, stride * j + v] += x[i, j, c] * w[u, v, c]
    return full[pt : full.shape[0] - pb, pl : full.shape[1] - pr]


def conv_transpose2d_grads(
    x: np.ndarray,
    w: np.ndarray,
    g: np.ndarray,
    stride: int = 1,
    pads: Pads = ((0, 0), (0, 0)),
    output_padding: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The gradients of ``L = sum(Y * G)`` for ``Y`` = :func:`conv_transpose2d_scatter`
    ``(X, K)``, by the chain rule on the scatter sum: each ``Y[s i + u - p, s j + v - p, o]``
    received ``X[i, j, c] K[u, v, c, o]``, so

    ``dL/dX[i, j, c] = sum_{u, v, o} Gfull[s i + u, s j + v, o] K[u, v, c, o]`` and
    ``dL/dK[u, v, c, o] = sum_{i, j} X[i, j, c] Gfull[s i + u, s j + v, o]``,

    with ``Gfull`` the full (uncropped) output's gradient: ``G`` placed at ``(p_top,
    p_left)``, zeros on the cropped rows and columns. ``x`` ``(H, W, C_in)``, ``w`` ``(kh,
    kw, C_in, C_out)``, ``g`` the output's shape. Returns ``(dX, dK)``.
    """
    x, _ = _as_hwc(x)
    w = _as_kernel(w)
    g = np.asarray(g, dtype=np.float64).reshape(-1, np.shape(g)[1], w.shape[3])
    kh, kw, c_in, c_out = w.shape
    (pt, _), (pl, _) = pads
    full = np.zeros(
        (stride * (x.shape[0] - 1) + kh + output_padding, stride * (x.shape[1] - 1) + kw + output_padding, c_out)
    )
    full[pt : pt + g.shape[0], pl : pl + g.shape[1]] = g
    dx, dw = np.zeros(x.shape), np.zeros(w.shape)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            for c in range(c_in):
                for u in range(kh):
                    for v in range(kw):
                        for o in range(c_out):
                            dx[i, j, c] += full[stride * i + u, stride * j + v, o] * w[u, v, c, o]
                            dw[u, v, c, o] += x[i, j, c] * full[stride * i + u, stride * j + v, o]
    return dx, dw
