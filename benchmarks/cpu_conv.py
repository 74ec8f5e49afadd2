"""Why the seed U-Net's CPU inference trails PyTorch: its convolutions, one shape at a time,
and the XLA:CPU flags that could change that.

    python -m benchmarks.cpu_conv layers   # every 3x3 convolution shape of the seed preset at 256x256
    python -m benchmarks.cpu_conv flags    # seed inference under each candidate XLA_FLAGS value
    taskset -c 1 python -m benchmarks.cpu_conv lowerings --size 128 --threads 1
                                           # each unet_jax.layers.lowering against PyTorch, per layer

``layers``: for each (spatial size, in -> out channels) of the seed U-Net, a jitted
``lax.conv_general_dilated`` against PyTorch's ``nn.Conv2d`` (channels-last, no grad,
same threads), batch 8, float32, median of 5 windows after warm-up; GFLOP/s from the
analytic count ``2 * B * H * W * 9 * C_in * C_out``. ``flags``: the seed preset's
inference (batch 8, 256x256, float32) in a fresh process per flag value, so that every
XLA_FLAGS value compiles its own program. ``lowerings``: for every 3x3 convolution shape
of a preset at ``--size`` (the seed shapes scaled from 256), each lowering of
:mod:`unet_jax.layers.lowering` (lax, direct up to 8 input channels, im2col, winograd2,
winograd4) jitted, forward and forward +
backward (input and kernel gradients for a random output cotangent), against ``nn.Conv2d`` (channels-last;
forward under no_grad, and forward + backward) with ``--threads`` PyTorch threads (1 when
pinned to one core, for a fair comparison); GFLOP/s from the nominal direct-convolution
count (3x for forward + backward), ``*_vs_torch`` = torch ms / JAX ms (above 1: JAX faster).
Prints one JSON object per line; ``--out`` writes them all to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import environment, median_ms, write_result

REPO = Path(__file__).resolve().parents[1]

# The seed preset's 3x3 convolutions at 256x256 (spatial side, in channels, out channels);
# the transposed convolutions are timed as part of the whole model in `flags`.
SEED_SHAPES = (
    (256, 3, 16),
    (256, 16, 16),
    (256, 32, 16),
    (128, 16, 32),
    (128, 32, 32),
    (128, 64, 32),
    (64, 32, 64),
    (64, 64, 64),
    (64, 128, 64),
    (32, 64, 128),
    (32, 128, 128),
    (32, 256, 128),
    (16, 128, 256),
    (16, 256, 256),
)

# XLA:CPU options that could route convolutions to another library or change codegen.
FLAG_CANDIDATES = (
    ("default", ""),
    ("ynn-convolution", "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"),
    ("xnn-graph-greedy", "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    ("onednn-custom-call", "--xla_cpu_experimental_onednn_custom_call=true"),
    ("vector-width-512", "--xla_cpu_prefer_vector_width=512"),
    ("no-xnnpack", "--xla_cpu_use_xnnpack=false"),
)


def layers(batch: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch
    from jax import lax

    rows = []
    for side, c_in, c_out in SEED_SHAPES:
        x, w = jnp.ones((batch, side, side, c_in)), jnp.ones((3, 3, c_in, c_out))
        conv = jax.jit(
            lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        )
        jax_ms = median_ms(lambda: conv(x, w).block_until_ready())
        xt = torch.ones(batch, c_in, side, side).to(memory_format=torch.channels_last)
        layer = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
        with torch.no_grad():
            torch_ms = median_ms(lambda: layer(xt))
        gflop = 2 * batch * side * side * 9 * c_in * c_out / 1e9
        rows.append(
            {
                "shape": f"{side}x{side} {c_in}->{c_out}",
                "gflop": round(gflop, 3),
                "jax_ms": round(jax_ms, 2),
                "torch_ms": round(torch_ms, 2),
                "jax_gflops": round(gflop / jax_ms * 1e3, 1),
                "torch_gflops": round(gflop / torch_ms * 1e3, 1),
                "jax_over_torch": round(torch_ms / jax_ms, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def preset_shapes(preset: str, size: int) -> list[tuple[int, int, int]]:
    """Distinct (side, in, out) of a preset's 3x3 stride-1 convolutions at ``size``."""
    if preset == "seed":
        return [(side * size // 256, c_in, c_out) for side, c_in, c_out in SEED_SHAPES]
    from benchmarks.lowering_table import conv_shapes
    from unet_jax.models.unet import create_unet

    model = create_unet(preset)
    found = conv_shapes(model, (1, size, size, model.in_channels))
    return list(
        dict.fromkeys(
            (s["shape"][1], s["shape"][3], s["features"])
            for s in found
            if s["kernel"] == (3, 3) and s["strides"] == (1, 1)
        )
    )


def _torch_ms(side: int, c_in: int, c_out: int, batch: int, windows: int, calls: int) -> tuple[float, float]:
    import torch

    x = torch.randn(batch, c_in, side, side).to(memory_format=torch.channels_last)
    layer = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(memory_format=torch.channels_last)
    with torch.no_grad():
        infer = median_ms(lambda: layer(x), windows, calls)
    xg = x.clone().requires_grad_(True)

    def step():
        xg.grad = None
        layer.zero_grad(set_to_none=True)
        layer(xg).sum().backward()

    return infer, median_ms(step, windows, calls)


def lowerings(batch: int, size: int, preset: str, threads: int, windows: int, calls: int) -> list[dict]:
    import torch

    from benchmarks.lowering_table import time_lowering
    from unet_jax.layers.lowering import candidates

    torch.set_num_threads(threads)
    rows = []
    for side, c_in, c_out in preset_shapes(preset, size):
        gflop = 2 * batch * side * side * 9 * c_in * c_out / 1e9
        t_infer, t_train = _torch_ms(side, c_in, c_out, batch, windows, calls)
        for name in candidates(c_in):
            shape = (batch, side, side, c_in)
            infer = time_lowering(name, shape, c_out, "infer", windows=windows, calls=calls)
            train = time_lowering(name, shape, c_out, "train", windows=windows, calls=calls)
            rows.append(
                {
                    "shape": f"{side}x{side} {c_in}->{c_out}",
                    "batch": batch,
                    "lowering": name,
                    "gflop": round(gflop, 3),
                    "infer_ms": round(infer, 2),
                    "train_ms": round(train, 2),
                    "torch_infer_ms": round(t_infer, 2),
                    "torch_train_ms": round(t_train, 2),
                    "infer_gflops": round(gflop / infer * 1e3, 1),
                    "train_gflops": round(3 * gflop / train * 1e3, 1),
                    "torch_infer_gflops": round(gflop / t_infer * 1e3, 1),
                    "torch_train_gflops": round(3 * gflop / t_train * 1e3, 1),
                    "infer_vs_torch": round(t_infer / infer, 3),
                    "train_vs_torch": round(t_train / train, 3),
                    "torch_threads": threads,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def seed_inference(batch: int) -> dict:
    """One flag setting (this process's XLA_FLAGS): seed preset inference images/s."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unet_jax.models import create_model

    model = create_model("seed", in_channels=3)
    x = jnp.asarray(np.random.default_rng(0).random((batch, 256, 256, 3), np.float32))
    variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    ms = median_ms(lambda: apply(variables, x).block_until_ready())
    return {"images_per_s": round(batch / ms * 1e3, 2)}


def flags(batch: int) -> list[dict]:
    rows = []
    for label, value in FLAG_CANDIDATES:
        env = {**os.environ, "XLA_FLAGS": value}
        done = subprocess.run(
            [sys.executable, "-m", "benchmarks.cpu_conv", "_one", "--batch", str(batch)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            row = {"flags": label, "xla_flags": value, "error": done.stderr.strip().splitlines()[-1:]}
        else:
            row = {"flags": label, "xla_flags": value, **json.loads(done.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("layers", "flags", "lowerings", "_one"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256, help="lowerings: input side of the preset")
    parser.add_argument("--preset", default="seed", help="lowerings: seed (its SEED_SHAPES) or another U-Net preset")
    parser.add_argument("--threads", type=int, default=1, help="lowerings: PyTorch threads (1 when pinned to one core)")
    parser.add_argument("--windows", type=int, default=5, help="lowerings: timed windows (median)")
    parser.add_argument("--calls", type=int, default=3, help="lowerings: calls per window")
    parser.add_argument("--out", default=None, help="write the rows and the machine to this JSON file")
    args = parser.parse_args()
    if args.mode == "_one":
        print(json.dumps(seed_inference(args.batch)))
        return 0
    if args.mode == "lowerings":
        rows = lowerings(args.batch, args.size, args.preset, args.threads, args.windows, args.calls)
    else:
        rows = layers(args.batch) if args.mode == "layers" else flags(args.batch)
    if args.out:
        import torch

        card = environment(torch, torch.device("cpu"))
        write_result(args.out, {"command": " ".join([Path(sys.executable).name, *sys.argv]), **card, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
