"""bfloat16 convolutions on the CPU's matrix units through oneDNN (issue 32).

XLA:CPU (jaxlib 0.10.x) does not reach this Xeon's AMX tiles: its optimised HLO turns a
bfloat16 convolution or dot into ``convert`` to float32, a float32 kernel and a
``convert`` back, and no flag (``--xla_cpu_use_onednn``,
``--xla_cpu_experimental_onednn_custom_call``, the XNN/YNN fusions) makes it call oneDNN
for a convolution (RESULTS, "bfloat16 on the CPU's matrix units"). So the convolution
itself is a ``jax.ffi`` custom call into oneDNN (``onednn_conv.cc`` beside this file),
whose bfloat16 kernels run on AMX (``ONEDNN_VERBOSE=1`` names
``brgconv:avx512_core_amx_bf16``), with its own VJP: the input gradient and the kernel
gradient are oneDNN's backward-data and backward-weights primitives, the kernel gradient
accumulated and returned in float32.

:func:`conv_bf16` is the layer's math, ``y[b, i, j, o] = sum_{u, v, c} xpad[b, s_h i + u,
s_w j + v, c] w[u, v, c, o]`` (NHWC, HWIO, no groups, no dilation), computed in bfloat16
with float32 accumulation. It is an optional path: the shared library is compiled on first
use from the packaged source with g++ against Debian's ``libdnnl-dev`` (oneDNN 2.x):

    apt-get install -y g++ libdnnl-dev

:func:`available` says whether it can be used here (the CPU backend, a compiler and the
headers, the library loads); :func:`has_amx` whether the CPU has the bfloat16 tiles.
Reverse mode only (``jax.grad``, ``jax.vjp``), like :mod:`.conv_grad`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MIN_CHANNELS",
    "available",
    "build",
    "buildable",
    "cache_dir",
    "conv_bf16",
    "conv_transpose_bf16",
    "has_amx",
    "transpose_fits",
    "use_onednn",
    "wanted",
]

SOURCE = Path(__file__).with_name("onednn_conv.cc")
TARGETS = {"ConvFwd": "unet_jax_onednn_conv_fwd", "ConvBwdData": "unet_jax_onednn_conv_bwd_data"}
TARGETS["ConvBwdWeights"] = "unet_jax_onednn_conv_bwd_weights"
HEADER = Path("/usr/include/oneapi/dnnl/dnnl.hpp")
INSTALL_HINT = "apt-get install -y g++ libdnnl-dev"
PadPairs = tuple[tuple[int, int], tuple[int, int]]
# Conv2D(lowering="onednn") keeps layers with fewer input channels than this on XLA in
# float32: a network's first layer, whose input is the image itself (8-bit pixels; bfloat16
# keeps 8 significant bits, so rounding it costs the most accuracy) and whose few channels
# give the matrix units almost nothing to do.
MIN_CHANNELS = 8


def cache_dir() -> Path:
    """Where the compiled library goes: ``$UNET_JAX_CACHE`` or ``~/.cache/unet_jax``."""
    return Path(os.environ.get("UNET_JAX_CACHE") or Path.home() / ".cache" / "unet_jax") / "onednn"


def has_amx() -> bool:
    """Whether this CPU reports the AMX bfloat16 tiles (``amx_bf16`` in /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in text.splitlines())


def build(out_dir: Path | None = None) -> Path:
    """Compile ``onednn_conv.cc`` (once per source and jax version) into ``out_dir``
    (default :func:`cache_dir`) and return the library's path. The library is written
    under a temporary name and renamed, so a killed build leaves nothing half-written.
    A missing compiler or oneDNN header is a RuntimeError naming the package to install."""
    if shutil.which("g++") is None:
        raise RuntimeError(f"the oneDNN convolution needs g++ to build {SOURCE.name}: {INSTALL_HINT}")
    if not HEADER.is_file():
        raise RuntimeError(f"the oneDNN convolution needs oneDNN's headers ({HEADER} is missing): {INSTALL_HINT}")
    out_dir = Path(out_dir) if out_dir is not None else cache_dir()
    digest = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode()).hexdigest()[:16]
    lib = out_dir / f"libunet_jax_onednn_{digest}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    cmd = ["g++", "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}"]
    try:
        done = subprocess.run([*cmd, str(SOURCE), "-o", tmp, "-ldnnl"], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} failed ({INSTALL_HINT}?):\n{done.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return lib


@functools.cache
def _registered() -> None:
    lib = ctypes.cdll.LoadLibrary(str(build()))
    for symbol, target in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def available() -> bool:
    """Whether :func:`conv_bf16` runs here: the default backend is the CPU and the library
    builds and loads (g++ and libdnnl-dev present)."""
    if jax.default_backend() != "cpu":
        return False
    try:
        _registered()
    except (RuntimeError, OSError):
        return False
    return True


def buildable() -> bool:
    """Whether :func:`build` can run here (g++ and oneDNN's headers), without building or
    starting a JAX backend."""
    return shutil.which("g++") is not None and HEADER.is_file()


def wanted(setting: str) -> bool:
    """Whether a run with ``cpu_bf16 = setting`` asks for the oneDNN path, decided before
    JAX starts a backend (``unet-jax train`` fixes the CPU device count first): ``'on'``,
    or ``'auto'`` on a CPU with AMX where the library can be built."""
    if setting not in ("off", "auto", "on"):
        raise ValueError(f"cpu_bf16 must be 'off', 'auto' or 'on', got {setting!r}")
    return setting == "on" or (setting == "auto" and has_amx() and buildable())


def use_onednn(setting: str) -> bool:
    """Whether the oneDNN path runs for ``cpu_bf16 = setting``: :func:`wanted` and
    :func:`available`; ``'on'`` where it cannot run is a RuntimeError saying why."""
    if not wanted(setting):
        return False
    if available():
        return True
    if setting == "auto":
        return False
    raise RuntimeError(
        f"cpu_bf16='on' needs the CPU backend (here {jax.default_backend()!r}) and the oneDNN build "
        f"({INSTALL_HINT}); set cpu_bf16='auto' or 'off'"
    )


def _output_hw(x_shape, w_shape, strides, pads) -> tuple[int, int]:
    return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(x_shape[1:3], w_shape[:2], strides, pads))  # type: ignore[return-value]


def _attrs(strides, pads) -> dict[str, np.int64]:
    (top, bottom), (left, right) = pads
    values = dict(sh=strides[0], sw=strides[1], phl=top, phh=bottom, pwl=left, pwh=right)
    return {k: np.int64(v) for k, v in values.items()}


def _call(name: str, out: jax.ShapeDtypeStruct, a: jax.Array, b: jax.Array, strides, pads) -> jax.Array:
    _registered()
    return jax.ffi.ffi_call(TARGETS[name], out)(a, b, **_attrs(strides, pads))


def conv_bf16(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: PadPairs) -> jax.Array:
    """The convolution of ``x`` (N, H, W, C) with ``w`` (kh, kw, C, F) in bfloat16 on
    oneDNN: both are rounded to bfloat16, products accumulate in float32, the output is
    bfloat16 (N, H_out, W_out, F), ``H_out = floor((H + top + bottom - kh) / s_h) + 1``.
    ``pads`` ``((top, bottom), (left, right))``, non-negative ints. The kernel gradient is
    computed in float32 (then cast to ``w``'s dtype): float32 parameters get float32
    updates."""
    strides = (int(strides[0]), int(strides[1]))
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if min(strides) < 1 or min(min(p) for p in pads) < 0:
        raise ValueError(f"conv_bf16: strides must be positive and pads non-negative, got {strides} and {pads}")
    x = x.astype(jnp.bfloat16)
    # oneDNN 2.6's kernel gradient crashes (heap corruption) when a vertical padding
    # reaches kh - 1 (e.g. ((2, 0), ...) for 3x3); padding past the "same" amount
    # (k - 1) // 2 is therefore done here, as zeros, and oneDNN pads the rest.
    inner = tuple((min(lo, (k - 1) // 2), min(hi, (k - 1) // 2)) for (lo, hi), k in zip(pads, w.shape[:2]))
    outer = [(lo - ilo, hi - ihi) for (lo, hi), (ilo, ihi) in zip(pads, inner)]
    if any(lo or hi for lo, hi in outer):
        x = jnp.pad(x, [(0, 0), *outer, (0, 0)])
    return _conv(x, w.astype(jnp.float32), strides, inner)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: PadPairs) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], *_output_hw(x.shape, w.shape, strides, pads), w.shape[3]), jnp.bfloat16)
    return _call("ConvFwd", out, x, w.astype(jnp.bfloat16), strides, pads)


def _forward(x, w, strides, pads):
    return _conv(x, w, strides, pads), (x, w.astype(jnp.bfloat16))


def _backward(strides, pads, residuals, dy):
    x, w = residuals
    dy = dy.astype(jnp.bfloat16)
    dx = _call("ConvBwdData", jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), dy, w, strides, pads)
    dw = _call("ConvBwdWeights", jax.ShapeDtypeStruct(w.shape, jnp.float32), x, dy, strides, pads)
    return dx, dw


_conv.defvjp(_forward, _backward)


def transpose_fits(x_shape, kernel: tuple[int, int], strides, crop: PadPairs, out_pad) -> bool:
    """Whether :func:`conv_transpose_bf16` computes this transposed convolution: it is the
    backward-data pass of the strided convolution whose paddings are ``crop``'s top/left
    and ``crop``'s bottom/right less ``output_padding``, which oneDNN takes when they are
    between 0 and ``(k - 1) // 2`` (see :func:`conv_bf16`)."""
    del x_shape
    for k, (lo, hi), op in zip(kernel, crop, out_pad):
        if not (0 <= lo <= (k - 1) // 2 and 0 <= hi - op <= (k - 1) // 2):
            return False
    return True


def conv_transpose_bf16(x: jax.Array, w: jax.Array, strides, crop: PadPairs, out_pad=(0, 0)) -> jax.Array:
    """The transposed convolution ``y[b, s_h i + u - p_top, s_w j + v - p_left, o] +=
    x[b, i, j, c] w[u, v, c, o]`` (:class:`~unet_jax.layers.ConvTranspose2D`'s definition)
    in bfloat16 on oneDNN: x (N, H, W, C), w (kh, kw, C, F) -> bfloat16 (N, s_h (H - 1) +
    kh - p_top - p_bottom + op_h, ..., F), ``crop`` ``((p_top, p_bottom), (p_left,
    p_right))``, ``out_pad`` ``(op_h, op_w)``.

    It is the adjoint of a convolution, so it runs oneDNN's backward-data primitive on
    that convolution's geometry (the output grid is its input, ``x`` its output), and its
    gradients are the same convolution's forward pass (for ``x``) and backward-weights
    pass (for ``w``, in float32). Precondition: :func:`transpose_fits`."""
    strides = (int(strides[0]), int(strides[1]))
    kernel = tuple(int(k) for k in w.shape[:2])
    if not transpose_fits(x.shape, kernel, strides, crop, out_pad):
        raise ValueError(
            f"conv_transpose_bf16: crop {crop} with output_padding {tuple(out_pad)} needs paddings "
            f"0 <= p <= (k - 1) // 2 for kernel {kernel}; use another ConvTranspose2D method"
        )
    pads = tuple((int(lo), int(hi) - int(op)) for (lo, hi), op in zip(crop, out_pad))
    return _conv_t(x.astype(jnp.bfloat16), jnp.swapaxes(w.astype(jnp.float32), 2, 3), strides, pads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_t(x: jax.Array, w_t: jax.Array, strides: tuple[int, int], pads: PadPairs) -> jax.Array:
    # w_t: (kh, kw, F, C), the adjoint convolution's kernel (input F = the output's channels).
    n, h, wd, _ = x.shape
    (top, bottom), (left, right) = pads
    kh, kw, f, _ = w_t.shape
    out_hw = (strides[0] * (h - 1) + kh - top - bottom, strides[1] * (wd - 1) + kw - left - right)
    out = jax.ShapeDtypeStruct((n, *out_hw, f), jnp.bfloat16)
    return _call("ConvBwdData", out, x, w_t.astype(jnp.bfloat16), strides, pads)


def _t_forward(x, w_t, strides, pads):
    return _conv_t(x, w_t, strides, pads), (x, w_t.astype(jnp.bfloat16))


def _t_backward(strides, pads, residuals, dy):
    x, w_t = residuals
    dy = dy.astype(jnp.bfloat16)
    dx = _call("ConvFwd", jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), dy, w_t, strides, pads)
    dw_t = _call("ConvBwdWeights", jax.ShapeDtypeStruct(w_t.shape, jnp.float32), dy, x, strides, pads)
    return dx, dw_t


_conv_t.defvjp(_t_forward, _t_backward)
