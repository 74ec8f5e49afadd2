"""Issue 32's probe: does a bfloat16 convolution reach this CPU's AMX tiles from JAX?

XLA:CPU (jaxlib 0.10.2) does not: its optimised HLO turns a bfloat16 dot into ``convert``
to float32, a float32 dot and a ``convert`` back, and neither ``--xla_cpu_use_onednn`` nor
``--xla_cpu_experimental_onednn_*`` calls oneDNN for it (no ``ONEDNN_VERBOSE`` line). This
probe compiles benchmarks/onednn_conv_probe.cc (oneDNN's forward convolution as a
``jax.ffi`` target; Debian's ``libdnnl-dev`` 2.6.3, OpenMP) and times one 3x3 layer,
64 -> 64 channels, batch 16, 128x128, NHWC, against XLA in float32 and bfloat16 in the same
process (median of 5 windows of 3 calls, ``benchmarks.harness.median_ms``):

    apt-get install -y libdnnl-dev
    ONEDNN_VERBOSE=1 python -m benchmarks.onednn_conv_probe --out benchmarks/results/onednn_conv_probe.json

With ``ONEDNN_VERBOSE=1`` oneDNN names its kernel (``brgconv:avx512_core_amx_bf16`` on an
AMX machine). Forward only; the gradients are the next step (issue 32).
tests/test_onednn_conv_probe.py checks the call against ``lax`` on small shapes.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import environment, median_ms, write_result

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "onednn_conv_probe_fwd"


def build(out_dir: Path) -> Path:
    """Compile the probe into ``out_dir``; a clear error when g++ or oneDNN's headers are missing."""
    if shutil.which("g++") is None:
        raise RuntimeError("the oneDNN probe needs g++: apt-get install -y g++")
    lib = out_dir / "libonednn_conv_probe.so"
    cmd = ["g++", "-O2", "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}"]
    done = subprocess.run([*cmd, str(SOURCE), "-o", str(lib), "-ldnnl"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"compiling {SOURCE} failed (is oneDNN installed? apt-get install -y libdnnl-dev):\n{done.stderr[-2000:]}"
        )
    return lib


def register(lib_path: Path) -> Callable[..., jax.Array]:
    """Register the compiled probe with XLA:CPU; returns ``conv(x, w, stride, padding)``:
    x bf16[N, H, W, C], w bf16[KH, KW, C, O], ``padding`` ((top, bottom), (left, right)),
    output bf16[N, OH, OW, O] with OH = floor((H + top + bottom - KH) / stride) + 1."""
    lib = ctypes.cdll.LoadLibrary(str(lib_path))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.ConvFwd), platform="cpu")

    def conv(x: jax.Array, w: jax.Array, stride: int = 1, padding=((1, 1), (1, 1))) -> jax.Array:
        (top, bottom), (left, right) = padding
        n, h, wd, _ = x.shape
        kh, kw, _, o = w.shape
        out = jax.ShapeDtypeStruct(
            (n, (h + top + bottom - kh) // stride + 1, (wd + left + right - kw) // stride + 1, o), jnp.bfloat16
        )
        attrs = dict(sh=stride, sw=stride, phl=top, phh=bottom, pwl=left, pwh=right)
        return jax.ffi.ffi_call(TARGET, out)(x, w, **{k: np.int64(v) for k, v in attrs.items()})

    return conv


def xla_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON result (rows, error, environment card)")
    parser.add_argument("--build-dir", default=".cache/onednn_probe", help="where the compiled probe goes")
    args = parser.parse_args()
    build_dir = Path(args.build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    conv = register(build(build_dir))

    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (16, 128, 128, 64), jnp.float32)
    w = 0.05 * jax.random.normal(kw, (3, 3, 64, 64), jnp.float32)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    reference = xla_conv(xb.astype(jnp.float32), wb.astype(jnp.float32))
    got = jax.jit(conv)(xb, wb).astype(jnp.float32)
    error = float(jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference)))
    jitted_xla, jitted_onednn = jax.jit(xla_conv), jax.jit(conv)
    rows = {
        "XLA float32": median_ms(lambda: jitted_xla(x, w).block_until_ready()),
        "XLA bfloat16": median_ms(lambda: jitted_xla(xb, wb).block_until_ready()),
        "oneDNN bfloat16 (ffi)": median_ms(lambda: jitted_onednn(xb, wb).block_until_ready()),
    }
    print(f"oneDNN vs float32 reference on bfloat16 inputs: max error / max |y| = {error:.2e}")
    for name, ms in rows.items():
        print(f"{name:24s} {ms:8.1f} ms")
    if args.out:
        result = {"layer": "3x3, 64->64, batch 16, 128x128, NHWC, forward", "median_ms": rows, "error": error}
        write_result(args.out, {**result, "environment": environment(None, None)})


if __name__ == "__main__":
    main()
