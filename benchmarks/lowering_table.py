"""The lowering tuner: times every convolution lowering of :mod:`unet_jax.layers.lowering` on the
3x3 layer shapes of a U-Net preset and writes the per-machine table that
``Conv2D(lowering='auto')`` reads (:func:`unet_jax.layers.lowering.choose_lowering`).

    python -m benchmarks.lowering_table tune [--preset seed --size 256 --batch 8]
    python -m benchmarks.lowering_table show

Timing by the harness's one rule (:func:`benchmarks.harness.median_ms`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks.harness import median_ms
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
from unet_jax.models.unet import create_unet

__all__ = ["conv_shapes", "time_lowering", "tune", "main"]


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------
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


def time_lowering(
    lowering: str,
    shape: tuple[int, int, int, int],
    c_out: int,
    mode: str = "infer",
    pads: PadPairs = ((1, 1), (1, 1)),
    windows: int = 5,
    calls: int = 3,
) -> float:
    """Median milliseconds of one jitted 3x3 stride-1 convolution by ``lowering``.

    ``mode='infer'``: the forward; ``'train'``: forward + backward (the input and kernel
    gradients for a random output cotangent).
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
    elif mode == "train":
        fn = jax.jit(lambda x, w, dy: jax.vjp(forward, x, w)[1](dy))
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
) -> dict[str, Any]:
    """Time every lowering on each distinct 3x3 stride-1 ungrouped Conv2D of a U-Net preset;
    write the table (atomically) to ``out`` (default :func:`table_path`) and return it.

    ``lowerings``: those to time (default :func:`candidates` of each shape). ``report``
    receives one dict per measured (shape, mode), e.g. to print progress.
    """
    model = create_unet(preset)
    shapes = conv_shapes(model, (batch, size, size, model.in_channels), train=False)
    seen = {}
    for s in shapes:
        if s["kernel"] == (3, 3) and s["strides"] == (1, 1) and s["groups"] == 1:
            seen.setdefault((s["shape"], s["features"], s["pads"]), None)
    entries = {}
    for (shape, c_out, pads), _ in seen.items():
        for mode in modes:
            ms = {
                name: round(time_lowering(name, shape, c_out, mode, pads, windows, calls), 3)
                for name in (lowerings or candidates(shape[3]))
            }
            best = min(ms, key=ms.get)
            key = table_key(shape[1], shape[2], shape[3], c_out, batch, mode, pads)
            entries[key] = {"best": best, "ms": ms}
            if report:
                report({"key": key, **entries[key]})
    table = {
        "format": TABLE_FORMAT,
        "machine": machine_id(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "preset": preset,
        "size": size,
        "batch": batch,
        "entries": entries,
    }
    write_json(out if out is not None else table_path(), table)
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.lowering_table tune|show``: make or print the per-machine table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lowering_table", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tune", help="time every lowering on a preset's 3x3 layers, write the table")
    t.add_argument("--preset", default="seed")
    t.add_argument("--size", type=int, default=256)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    t.add_argument("--windows", type=int, default=3)
    t.add_argument("--out", default=None, help=f"table file (default: ${TABLE_ENV} or the user cache)")
    s = sub.add_parser("show", help="print the table")
    s.add_argument("--path", default=None)
    args = parser.parse_args(argv)
    if args.command == "tune":
        table = tune(
            args.preset,
            args.size,
            args.batch,
            args.modes,
            windows=args.windows,
            out=args.out,
            report=lambda row: print(json.dumps(row), flush=True),
        )
        print(f"wrote {len(table['entries'])} entries to {args.out or table_path()}")
        return 0
    path = Path(args.path) if args.path else table_path()
    table = load_table(path)
    if table is None:
        print(f"no lowering table at {path}; 'auto' means 'lax' (make one: python -m benchmarks.lowering_table tune)")
        return 1
    print(
        f"{path} (machine {table.get('machine')}, preset {table.get('preset')}, size {table.get('size')}, "
        f"batch {table.get('batch')})"
    )
    for key, entry in table["entries"].items():
        times = " ".join(f"{k}={v}" for k, v in entry.get("ms", {}).items())
        print(f"{key:40s} {entry['best']:10s} {times}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
