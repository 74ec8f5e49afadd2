"""Why the seed U-Net's CPU inference trails PyTorch: its convolutions, one shape at a time,
and the XLA:CPU flags that could change that.

    python -m benchmarks.cpu_conv layers   # every 3x3 convolution shape of the seed preset at 256x256
    python -m benchmarks.cpu_conv flags    # seed inference under each candidate XLA_FLAGS value
    taskset -c 1 python -m benchmarks.cpu_conv lowerings --size 128 --threads 1
                                           # each unet_jax.layers.lowering against PyTorch, per layer
    python -m benchmarks.cpu_conv tune [--preset seed --size 256 --batch 8]
                                           # the per-machine table Conv2D(lowering='auto') reads
    python -m benchmarks.cpu_conv show     # print that table

``layers``: for each (spatial size, in -> out channels) of the seed U-Net, a jitted
``lax.conv_general_dilated`` against PyTorch's ``nn.Conv2d`` (channels-last, no grad,
same threads), batch 8, float32, median of 5 windows after warm-up; GFLOP/s from the
analytic count ``2 * B * H * W * 9 * C_in * C_out``. ``flags``: the seed preset's
inference (batch 8, 256x256, float32) in a fresh process per flag value, so that every
XLA_FLAGS value compiles its own program. ``lowerings``: for every 3x3 convolution shape
of a preset at ``--size`` (the seed shapes scaled from 256), each lowering of
:mod:`unet_jax.layers.lowering` (lax, direct and stem up to 8 input channels, im2col,
winograd2, winograd4) jitted, forward and forward +
backward (input and kernel gradients for a random output cotangent), against ``nn.Conv2d`` (channels-last;
forward under no_grad, and forward + backward) with ``--threads`` PyTorch threads (1 when
pinned to one core, for a fair comparison); GFLOP/s from the nominal direct-convolution
count (3x for forward + backward), ``*_vs_torch`` = torch ms / JAX ms (above 1: JAX faster).
Prints one JSON object per line; ``--out`` writes them all to a file.

``tune`` (the lowering tuner): times every lowering, forward and forward + backward, on each
distinct 3x3 stride-1 layer of a preset (found by :func:`conv_shapes`, with its padding) by
the same :func:`time_lowering` as ``lowerings``, and writes the table that
``Conv2D(lowering='auto')`` reads (:func:`unet_jax.layers.lowering.choose_lowering`); ``show``
prints it. Timing by the harness's one rule (:func:`benchmarks.harness.median_ms`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from benchmarks.harness import REPO, environment, median_ms, write_result
from benchmarks.throughput import parse_fields
from unet_jax._io import write_json
from unet_jax.layers import Conv2D, resolve_padding
from unet_jax.layers.lowering import (
    TABLE_ENV,
    TABLE_FORMAT,
    PadPairs,
    candidates,
    load_table,
    lower_conv,
    machine_id,
    table_key,
    table_path,
)
from unet_jax.models import create_model
from unet_jax.models.unet import create_unet

__all__ = ["conv_shapes", "time_lowering", "tune", "main"]


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
    import torch  # the PyTorch peer: a test-only dependency, imported where it is timed

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
    import torch  # the PyTorch peer: a test-only dependency

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
    import torch  # the PyTorch peer: a test-only dependency

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


# --------------------------------------------------------------------------------------
# The lowering tuner (the table Conv2D(lowering='auto') reads); lowerings() times with it
# --------------------------------------------------------------------------------------
def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def conv_shapes(model: Any, x_shape: tuple[int, ...], **call_kwargs: Any) -> list[dict[str, Any]]:
    """Every :class:`~unet_jax.layers.Conv2D` call of ``model`` on an input of ``x_shape``:
    dicts with ``shape`` (its NHWC input), ``features``, ``kernel``, ``strides``, ``pads``,
    ``groups``, in call order (duplicates kept). Traced abstractly (no arithmetic)."""
    found: list[dict[str, Any]] = []

    def record(next_fun, args, kwargs, context):
        mod = context.module
        if isinstance(mod, Conv2D) and context.method_name == "__call__":
            x = args[0]
            shape = tuple(x.shape) if mod.layout == "NHWC" else (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
            kernel, strides = _pair(mod.kernel_size), _pair(mod.strides)
            found.append(
                dict(
                    shape=shape,
                    features=mod.features,
                    kernel=kernel,
                    strides=strides,
                    pads=resolve_padding(mod.padding, shape[1:3], kernel, strides),
                    groups=mod.feature_group_count,
                )
            )
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **call_kwargs), x)
    return found


def _with_output(primal_and_pullback: tuple[Any, Callable], dy: jax.Array) -> tuple[Any, Any]:
    """The forward's output and the gradients: returning the output keeps the forward in
    the timed program, as in a training step (unused, XLA would drop it as dead code)."""
    y, pullback = primal_and_pullback
    return y, pullback(dy)


def time_lowering(
    lowering: str,
    shape: tuple[int, int, int, int],
    c_out: int,
    mode: str = "infer",
    pads: PadPairs = ((1, 1), (1, 1)),
    windows: int = 5,
    calls: int = 3,
    input_gradient: bool = True,
) -> float:
    """Median milliseconds of one jitted 3x3 stride-1 convolution by ``lowering``.

    ``mode='infer'``: the forward; ``'train'``: forward + backward (the output and the input
    and kernel gradients for a random output cotangent; the kernel gradient alone with
    ``input_gradient=False``, as for a network's first layer, whose input is the data).
    """
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], c_out), np.float32) * 0.1)
    ho, wo = shape[1] + sum(pads[0]) - 2, shape[2] + sum(pads[1]) - 2
    # An argument, not jnp.sum's constant ones: XLA would simplify a backward pass whose
    # cotangent it can see (measured: conv_direct's "backward" faster than its forward).
    dy = jnp.asarray(rng.standard_normal((shape[0], ho, wo, c_out), np.float32))

    def forward(x, w):
        return lower_conv(lowering, x, w, (1, 1), pads)

    if mode == "infer":
        fn = jax.jit(lambda x, w, dy: forward(x, w))
    elif mode == "train" and input_gradient:
        fn = jax.jit(lambda x, w, dy: _with_output(jax.vjp(forward, x, w), dy))
    elif mode == "train":
        fn = jax.jit(lambda x, w, dy: _with_output(jax.vjp(lambda w: forward(x, w), w), dy))
    else:
        raise ValueError(f"mode must be 'infer' or 'train', got {mode!r}")
    return median_ms(lambda: jax.block_until_ready(fn(x, w, dy)), windows, calls)


def tune(
    preset: str = "seed",
    size: int = 256,
    batch: int = 8,
    modes: Sequence[str] = ("infer", "train"),
    lowerings: Sequence[str] | None = None,
    windows: int = 3,
    calls: int = 2,
    out: str | os.PathLike | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time every lowering on each distinct 3x3 stride-1 ungrouped Conv2D of a U-Net preset;
    write the table (atomically) to ``out`` (default :func:`table_path`) and return it.

    A table already at ``out`` from this machine keeps its other entries (tune several
    presets and sizes into one file). ``lowerings``: those to time, each where
    :func:`candidates` allows it (default: all of them). ``report``
    receives one dict per measured (shape, mode), e.g. to print progress. ``model``:
    field overrides of the preset (e.g. ``{"features": 16}``). The layer that reads the
    network's input is timed in ``'train'`` mode on its kernel gradient alone (a training
    step never asks for the image's gradient); its entries say so (``"input_gradient":
    false``).
    """
    net = create_unet(preset, **(model or {}))
    x_shape = (batch, size, size, net.in_channels)
    shapes = conv_shapes(net, x_shape, train=False)
    seen = {}
    for s in shapes:
        if s["kernel"] == (3, 3) and s["strides"] == (1, 1) and s["groups"] == 1:
            seen.setdefault((s["shape"], s["features"], s["pads"]), None)
    entries = {}
    for (shape, c_out, pads), _ in seen.items():
        input_gradient = shape != x_shape
        names = [n for n in candidates(shape[3]) if lowerings is None or n in lowerings]
        if len(names) < 2:
            continue  # nothing to choose between: 'auto' falls back to lax without an entry
        for mode in modes:
            ms = {
                name: round(
                    time_lowering(name, shape, c_out, mode, pads, windows, calls, input_gradient or mode != "train"), 3
                )
                for name in names
            }
            best = min(ms, key=ms.get)
            key = table_key(shape[1], shape[2], shape[3], c_out, batch, mode, pads)
            entries[key] = {"best": best, "ms": ms}
            if mode == "train" and not input_gradient:
                entries[key]["input_gradient"] = False
            if report:
                report({"key": key, **entries[key]})
    out = Path(out) if out is not None else table_path()
    tuned = [{"preset": preset, "size": size, "batch": batch, "model": dict(model or {})}]
    previous = load_table(out)  # None when there is none yet
    if previous and previous.get("machine") == machine_id():
        # Several presets and sizes share one table: keep this machine's other entries.
        entries = {**previous.get("entries", {}), **entries}
        tuned = [*previous.get("tuned", []), *tuned]
    table = {
        "format": TABLE_FORMAT,
        "machine": machine_id(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "preset": preset,
        "size": size,
        "batch": batch,
        "tuned": tuned,
        "entries": entries,
    }
    write_json(out, table)
    return table


def show(path: str | None) -> int:
    """Print the per-machine lowering table (1 when there is none)."""
    path = Path(path) if path else table_path()
    table = load_table(path)
    if table is None:
        print(f"no lowering table at {path}; 'auto' means 'lax' (make one: python -m benchmarks.cpu_conv tune)")
        return 1
    print(
        f"{path} (machine {table.get('machine')}, preset {table.get('preset')}, size {table.get('size')}, "
        f"batch {table.get('batch')})"
    )
    for key, entry in table["entries"].items():
        times = " ".join(f"{k}={v}" for k, v in entry.get("ms", {}).items())
        print(f"{key:40s} {entry['best']:10s} {times}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu_conv",
        description=__doc__.split("\n\n")[0],
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode, text in (
        ("layers", "each 3x3 layer shape of the seed preset: XLA against PyTorch"),
        ("flags", "seed inference under each candidate XLA_FLAGS value"),
        ("_one", argparse.SUPPRESS),
    ):
        p = sub.add_parser(mode, help=text)
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--out", default=None, help="write the rows and the machine to this JSON file")
    p = sub.add_parser("lowerings", help="each lowering against PyTorch, per layer")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=256, help="input side of the preset")
    p.add_argument("--preset", default="seed", help="seed (its SEED_SHAPES) or another U-Net preset")
    p.add_argument("--threads", type=int, default=1, help="PyTorch threads (1 when pinned to one core)")
    p.add_argument("--windows", type=int, default=5, help="timed windows (median)")
    p.add_argument("--calls", type=int, default=3, help="calls per window")
    p.add_argument("--out", default=None, help="write the rows and the machine to this JSON file")
    t = sub.add_parser("tune", help="time every lowering on a preset's 3x3 layers, write the table")
    t.add_argument("--preset", default="seed")
    t.add_argument("--size", type=int, default=256)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    t.add_argument("--windows", type=int, default=3)
    t.add_argument("--model", type=parse_fields, default={}, help="preset field overrides, e.g. features=16")
    t.add_argument(
        "--lowerings",
        type=lambda text: [x for x in text.split(",") if x],
        default=None,
        help="time only these (e.g. lax,direct,stem: the first layer's choice, lax elsewhere)",
    )
    t.add_argument("--out", default=None, help=f"table file (default: ${TABLE_ENV} or the user cache)")
    s = sub.add_parser("show", help="print the table")
    s.add_argument("--path", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.mode == "_one":
        print(json.dumps(seed_inference(args.batch)))
        return 0
    if args.mode == "show":
        return show(args.path)
    if args.mode == "tune":
        table = tune(
            args.preset,
            args.size,
            args.batch,
            args.modes,
            windows=args.windows,
            out=args.out,
            lowerings=args.lowerings,
            report=lambda row: print(json.dumps(row), flush=True),
            model=args.model,
        )
        print(f"wrote {len(table['entries'])} entries to {args.out or table_path()}")
        return 0
    if args.mode == "lowerings":
        rows = lowerings(args.batch, args.size, args.preset, args.threads, args.windows, args.calls)
    else:
        rows = layers(args.batch) if args.mode == "layers" else flags(args.batch)
    if args.out:
        import torch  # the PyTorch peer: a test-only dependency

        card = environment(torch, torch.device("cpu"))
        write_result(args.out, {"command": " ".join([Path(sys.executable).name, *sys.argv]), **card, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
