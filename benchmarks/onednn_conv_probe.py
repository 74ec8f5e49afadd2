"""Issue 32's probe: does a bfloat16 convolution reach this CPU's AMX tiles from JAX?

XLA:CPU (jaxlib 0.10.2) does not: its optimised HLO turns a bfloat16 dot or convolution
into ``convert`` to float32, a float32 dot/convolution and a ``convert`` back, and neither
``--xla_cpu_use_onednn`` nor ``--xla_cpu_experimental_onednn_*`` calls oneDNN for it (no
``ONEDNN_VERBOSE`` line). This probe compiles benchmarks/onednn_conv_probe.cc (oneDNN's
forward convolution as a ``jax.ffi`` target, Debian's ``libdnnl-dev`` 2.6.3, OpenMP) and
times one layer, 64 -> 64 channels, batch 16, 128x128, NHWC, against XLA in float32 and
bfloat16 in the same process:

    apt-get install -y libdnnl-dev
    ONEDNN_VERBOSE=1 python -m benchmarks.onednn_conv_probe

With ``ONEDNN_VERBOSE=1`` oneDNN names its kernel (``brgconv:avx512_core_amx_bf16`` on an
AMX machine). Forward only; the gradients are the next step (issue 32).
"""

from __future__ import annotations

import ctypes
import subprocess
import tempfile
import time
from pathlib import Path


def build(out_dir: Path) -> Path:
    import jax

    lib = out_dir / "libonednn_conv_probe.so"
    src = Path(__file__).with_suffix(".cc")
    cmd = [
        "g++",
        "-O2",
        "-shared",
        "-fPIC",
        "-std=c++17",
        "-w",
        f"-I{jax.ffi.include_dir()}",
        str(src),
        "-o",
        str(lib),
        "-ldnnl",
    ]
    subprocess.run(cmd, check=True)
    return lib


def best_ms(fn, *args, repeats: int = 5) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        lib = ctypes.cdll.LoadLibrary(str(build(Path(tmp))))
        jax.ffi.register_ffi_target("onednn_conv_probe_fwd", jax.ffi.pycapsule(lib.ConvFwd), platform="cpu")

        def onednn_conv(x, w):
            n, h, wd, _ = x.shape
            one = np.int64(1)
            out = jax.ShapeDtypeStruct((n, h, wd, w.shape[3]), jnp.bfloat16)
            return jax.ffi.ffi_call("onednn_conv_probe_fwd", out)(
                x, w, sh=one, sw=one, phl=one, phh=one, pwl=one, pwh=one
            )

        def xla_conv(x, w):
            return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        kx, kw = jax.random.split(jax.random.PRNGKey(0))
        x = jax.random.normal(kx, (16, 128, 128, 64), jnp.float32)
        w = 0.05 * jax.random.normal(kw, (3, 3, 64, 64), jnp.float32)
        xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        reference = xla_conv(xb.astype(jnp.float32), wb.astype(jnp.float32))
        got = jax.jit(onednn_conv)(xb, wb).astype(jnp.float32)
        error = float(jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference)))
        rows = {
            "XLA float32": best_ms(jax.jit(xla_conv), x, w),
            "XLA bfloat16": best_ms(jax.jit(xla_conv), xb, wb),
            "oneDNN bfloat16 (ffi)": best_ms(jax.jit(onednn_conv), xb, wb),
        }
    print(f"oneDNN vs float32 reference on bfloat16 inputs: max error / max |y| = {error:.2e}")
    for name, ms in rows.items():
        print(f"{name:24s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
