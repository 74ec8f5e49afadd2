"""Issue 32: one convolution layer on XLA:CPU (float32, bfloat16) against the oneDNN
bfloat16 custom call (:mod:`unet_jax.layers.onednn`, AMX), forward and forward + backward,
in one process (median of 5 windows of 3 calls, ``benchmarks.harness.median_ms``):

    apt-get install -y g++ libdnnl-dev
    ONEDNN_VERBOSE=1 python -m benchmarks.onednn_conv --out benchmarks/results/onednn_conv.json

The layer: 3x3, 64 -> 64 channels, batch 16, 128x128, NHWC (issue 32's). The float32 rows
take the CPU path's gradients (``conv_explicit_grad``, canonical convolutions); XLA's
bfloat16 convolution converts to float32 and back (no AMX). With ``ONEDNN_VERBOSE=1``
oneDNN names its kernels (``brgconv:avx512_core_amx_bf16`` on an AMX machine).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.harness import environment, median_ms, write_result
from unet_jax.layers import onednn
from unet_jax.layers.conv_grad import conv_explicit_grad

PADS = ((1, 1), (1, 1))


def xla_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return conv_explicit_grad(x, w, (1, 1), PADS)


def onednn_conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return onednn.conv_bf16(x, w, (1, 1), PADS)


def _train(conv):
    """Forward + both gradients of ``sum(conv(x, w) * g)``, jitted."""
    return jax.jit(jax.grad(lambda x, w, g: jnp.sum(conv(x, w).astype(jnp.float32) * g), (0, 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="JSON result (rows, errors, environment card)")
    args = parser.parse_args()
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (16, 128, 128, 64), jnp.float32)
    w = 0.05 * jax.random.normal(kw, (3, 3, 64, 64), jnp.float32)
    g = jax.random.normal(kg, (16, 128, 128, 64), jnp.float32)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    reference = xla_conv(xb.astype(jnp.float32), wb.astype(jnp.float32))
    got = jax.jit(onednn_conv)(xb, wb).astype(jnp.float32)
    error = float(jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference)))
    fwd = {name: jax.jit(f) for name, f in (("xla", xla_conv), ("onednn", onednn_conv))}
    train = {name: _train(f) for name, f in (("xla", xla_conv), ("onednn", onednn_conv))}
    rows = {
        "forward": {
            "XLA float32": median_ms(lambda: fwd["xla"](x, w).block_until_ready()),
            "XLA bfloat16": median_ms(lambda: fwd["xla"](xb, wb).block_until_ready()),
            "oneDNN bfloat16": median_ms(lambda: fwd["onednn"](x, w).block_until_ready()),
        },
        "forward + backward": {
            "XLA float32": median_ms(lambda: jax.block_until_ready(train["xla"](x, w, g))),
            "oneDNN bfloat16": median_ms(lambda: jax.block_until_ready(train["onednn"](x, w, g))),
        },
    }
    print(f"oneDNN vs float32 reference on bfloat16 inputs: max error / max |y| = {error:.2e}")
    for mode, times in rows.items():
        for name, ms in times.items():
            print(f"{mode:20s} {name:18s} {ms:8.1f} ms")
    if args.out:
        result = {"layer": "3x3, 64->64, batch 16, 128x128, NHWC", "median_ms": rows, "error": error}
        write_result(args.out, {**result, "environment": environment(None, None)})


if __name__ == "__main__":
    main()
