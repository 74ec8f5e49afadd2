"""The CPU levers that need a fresh process (XLA flags are read once, when jax starts):
threading, host devices and every XLA:CPU switch of this jaxlib, each against the PyTorch
peer measured in the same run.

    python -m benchmarks.cpu_levers --presets seed,padded --size 128 --batch 16 \\
        --out benchmarks/results/cpu_levers_128.json
    python -m benchmarks.cpu_levers --presets seed --jax-paths scan --repeats 3 \\
        --variants two_devices,two_devices+fast_math+vector_512 --out ...

Every variant runs ``benchmarks/throughput.py`` (JAX training step one step per dispatch
and scanned, inference; float32) in its own process with its own ``XLA_FLAGS``. A variant
is a base (``VARIANTS``) or a base and levers joined by ``+`` (``LEVERS``: one XLA:CPU
flag each, as listed by the binary in benchmarks/results/xla_cpu_flags.txt):

* ``default``: XLA:CPU as it starts, one device using every core;
* ``eigen_1_thread``: ``--xla_cpu_multi_thread_eigen=false`` (convolutions and matrix
  products on one thread each);
* ``two_devices``: ``--xla_force_host_platform_device_count=2`` and ``--mesh``, the batch
  split over two CPU devices (data parallel, as the training loop runs on every device);
* ``two_devices_eigen_1_thread``: both, one thread per device;
* ``two_devices+LEVER`` (e.g. ``two_devices+onednn``): the user path with one more flag;
  ``+rbg`` / ``+unsafe_rbg`` (``ARG_LEVERS``): dropout bits from XLA's RngBitGenerator;
  ``+fold_bn``: inference with batch norm folded into the convolutions (throughput.py
  ``--fold-bn``); ``+auto_lowering`` (``MODEL_LEVERS``): the model field
  ``lowering='auto'``, every 3x3 layer by the machine's tuned lowering table (tune it
  first: ``python -m benchmarks.cpu_conv tune``).

PyTorch (eager, channels-last, ``torch.set_num_threads`` = the cores) runs in its own
process before the variants of each repeat. Prints one table row per (preset, variant,
repeat) with images/s and the ratio to that repeat's PyTorch; the JSON holds every window,
the load averages (``os.getloadavg``) before each process, and per variant the median
ratio over the repeats with its min and max. Run it on a quiet machine: the variants are
timed one after another, not interleaved; on a shared one the ratio to the PyTorch of the
same repeat is the comparable figure.

``model`` (``python -m benchmarks.cpu_levers model ...``): the levers of the JAX training
step and of inference that a model field or an argument switches, each alone, in this one
process (dtype, steps per dispatch, donation, up-convolution, layout, gradient, folded
batch norm), on the CPU or an accelerator; see :func:`model_main`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.flops import preset_flops
from benchmarks.harness import REPO, environment, time_windows, write_result
from benchmarks.throughput import DTYPES, make_host_data, parse_fields, pick_steps, stats
from unet_jax.config import TrainConfig
from unet_jax.data.augment import DeviceData, make_sampler
from unet_jax.losses import get_loss
from unet_jax.models import create_unet, fold_batch_norm
from unet_jax.train.state import create_train_state, make_optimizer
from unet_jax.train.steps import get_train_steps

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "default": ("", []),
    "eigen_1_thread": ("--xla_cpu_multi_thread_eigen=false", []),
    "two_devices": ("--xla_force_host_platform_device_count=2", ["--mesh"]),
    "two_devices_eigen_1_thread": (
        "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false",
        ["--mesh"],
    ),
}
# One XLA:CPU flag each (names and values from the binary: benchmarks/results/xla_cpu_flags.txt).
LEVERS: dict[str, str] = {
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    "onednn_fusion": "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "xnn_fusion": "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "ynn_fusion": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "xnn_graph_greedy": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "xnn_graph_slinky": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY_SLINKY",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    "vector_512": "--xla_cpu_prefer_vector_width=512",
    "fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "concurrency_scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
    "memory_scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
    "tiling_propagation": "--xla_cpu_experimental_enable_tiling_propagation=true",
    "eigen_1_thread": "--xla_cpu_multi_thread_eigen=false",
}
# Levers that are throughput.py arguments, not flags.
ARG_LEVERS: dict[str, list[str]] = {
    "rbg": ["--dropout-prng", "rbg"],
    "unsafe_rbg": ["--dropout-prng", "unsafe_rbg"],
    "fold_bn": ["--fold-bn"],
    # The project's GPU policy on the CPU: float32 parameters, bfloat16 activations and
    # convolutions (XLA:CPU converts them to float32 and back: no AMX).
    "bf16": ["--dtypes", "bfloat16"],
}
# Levers that are model fields (throughput.py --model, JAX only): ``auto_lowering`` lets
# every 3x3 convolution take the machine's tuned lowering (python -m benchmarks.cpu_conv
# tune; unet_jax.layers.lowering), e.g. conv_stem for the first layer.
MODEL_LEVERS: dict[str, str] = {
    "auto_lowering": "lowering=auto",
    # TrainConfig.cpu_bf16 (issue 32): the convolutions and up-convolutions in bfloat16 on
    # AMX through oneDNN (unet_jax.layers.onednn), the rest float32; one device.
    "onednn_bf16": "lowering=onednn,up_method=onednn",
    "dropout8": "dropout_bits=8",
}
# PyTorch peers (eager, channels-last): float32, and bfloat16 autocast (float32 parameters,
# oneDNN's AMX kernels for the convolutions): ``--torch-dtypes``.
TORCH_DTYPES = ("float32", "bfloat16")
PATHS = ("train_single", "train_scan", "infer")


def variant(name: str) -> tuple[str, list[str]]:
    """``base+lever+...``: the base's flags and arguments with each lever's flag added."""
    base, *levers = name.split("+")
    known = {*LEVERS, *ARG_LEVERS, *MODEL_LEVERS}
    if base not in VARIANTS or any(lever not in known for lever in levers):
        raise SystemExit(
            f"unknown variant {name!r}; expected a base of {sorted(VARIANTS)} and levers of {sorted(known)}"
        )
    flags, extra = VARIANTS[base]
    flags = " ".join([flags, *(LEVERS[lever] for lever in levers if lever in LEVERS)]).strip()
    return flags, [*extra, *(a for lever in levers for a in ARG_LEVERS.get(lever, []))]


def variant_model(name: str, model: str = "") -> str:
    """``--model`` for a variant's JAX process: ``model`` and its model-field levers."""
    levers = name.split("+")[1:]
    return ",".join(x for x in (model, *(MODEL_LEVERS[lever] for lever in levers if lever in MODEL_LEVERS)) if x)


def _throughput(
    args: argparse.Namespace, preset: str, framework: str, flags: str, extra: list[str], model: str | None = None
) -> dict:
    """One throughput.py process; its JSON row for ``preset`` (``model``: ``--model``, default ``args.model``)."""
    model = args.model if model is None else model
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        load = [round(x, 2) for x in os.getloadavg()]
        env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.throughput",
            "--frameworks",
            framework,
            "--presets",
            preset,
            "--size",
            str(args.size),
            "--batches",
            str(args.batch),
            "--dtypes",
            "float32",
            "--windows",
            str(args.windows),
            "--torch-compile",
            "off",
            "--jax-paths",
            args.jax_paths,
            "--modes",
            args.modes,
            "--out",
            str(out),
            *extra,
        ]
        if model:
            cmd += ["--model", model]
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout_s)
        if proc.returncode != 0:
            return {"error": proc.stderr[-1500:]}
        rows = json.loads(out.read_text())["rows"]
        return {**rows[0][framework], "load_average": load}


def _ips(row: dict, path: str) -> float | None:
    return row.get(path, {}).get("images_per_s") if isinstance(row.get(path), dict) else None


def _summary(repeats: list[dict]) -> dict:
    """Per path: the median images/s and ratio to PyTorch over the repeats, with min and max."""
    out = {}
    for path in PATHS:
        ratios = [
            r[path]["ratio_to_torch"] for r in repeats if isinstance(r.get(path), dict) and "ratio_to_torch" in r[path]
        ]
        ips = [_ips(r, path) for r in repeats if _ips(r, path)]
        if ratios:
            out[path] = {
                "images_per_s": round(statistics.median(ips), 2),
                "ratio_to_torch": round(statistics.median(ratios), 3),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "repeats": len(ratios),
            }
            bf16 = [r[path]["ratio_to_torch_bfloat16"] for r in repeats if "ratio_to_torch_bfloat16" in r.get(path, {})]
            if bf16:
                out[path].update(
                    ratio_to_torch_bfloat16=round(statistics.median(bf16), 3),
                    ratio_to_torch_bfloat16_min=min(bf16),
                    ratio_to_torch_bfloat16_max=max(bf16),
                )
    return out


def _row_line(preset: str, name: str, row: dict, peer: dict) -> str:
    cells = []
    for p in PATHS:
        if not (_ips(row, p) and peer.get(p)):
            cells.append(f"{'error' if 'error' in row else '-':>13s}")
            continue
        bf16 = row[p].get("ratio_to_torch_bfloat16")
        cells.append(f"{_ips(row, p):6.1f} {row[p]['ratio_to_torch']:5.2f}x" + (f" {bf16:5.2f}x" if bf16 else ""))
    return f"{preset:8s} {name:40s} " + " ".join(cells) + f"  load {row.get('load_average')}"


def _torch_peers(args: argparse.Namespace, preset: str, rows: dict, repeat: int) -> dict[str, dict]:
    """This repeat's PyTorch rows, one per ``--torch-dtypes`` entry: {dtype: {path: img/s}}."""
    peers = {}
    for dtype in args.torch_dtypes:
        torch_row = _throughput(args, preset, "torch", "", ["--dtypes", dtype])
        rows["torch" if dtype == "float32" else f"torch_{dtype}"].append(torch_row)
        peers[dtype] = {p: _ips(torch_row, "train" if p.startswith("train") else "infer") for p in PATHS}
        print(
            f"{preset:8s} {f'torch {dtype} (eager, channels-last) #{repeat + 1}':40s} "
            + " ".join(f"{(peers[dtype][p] or 0):13.1f}" for p in PATHS)
            + f"  load {torch_row.get('load_average')}",
            flush=True,
        )
    return peers


def _measure(args: argparse.Namespace, preset: str, names: list[str], result: dict) -> None:
    """Every repeat: PyTorch (each of ``--torch-dtypes``), then each variant; ratios against
    that repeat's PyTorch (``ratio_to_torch``: float32; ``ratio_to_torch_bfloat16``)."""
    peers_keys = {"torch" if d == "float32" else f"torch_{d}": [] for d in args.torch_dtypes}
    rows = result["rows"].setdefault(preset, {**peers_keys, **{n: {} for n in names}})
    for repeat in range(args.repeats):
        peers = _torch_peers(args, preset, rows, repeat)
        peer = peers.get("float32", {})
        for name in names:
            flags, extra = variant(name)
            row = _throughput(args, preset, "jax", flags, extra, variant_model(name, args.model))
            for path in PATHS:
                for dtype, key in (("float32", "ratio_to_torch"), ("bfloat16", "ratio_to_torch_bfloat16")):
                    if _ips(row, path) and peers.get(dtype, {}).get(path):
                        row[path][key] = round(_ips(row, path) / peers[dtype][path], 3)
            entry = rows[name]
            entry.update(xla_flags=flags, args=extra, model=variant_model(name, args.model))
            entry.setdefault("repeats", []).append(row)
            entry["median"] = _summary(entry["repeats"])
            write_result(Path(args.out), result)
            print(_row_line(preset, f"{name} #{repeat + 1}", row, peer), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="seed,padded")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--model", default="", help="architecture overrides, e.g. features=4,depth=2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="bases, or base+lever+... (see LEVERS)")
    ap.add_argument("--jax-paths", default="single,scan", help="throughput.py's: single, scan or both")
    ap.add_argument("--modes", default="train,infer", help="throughput.py's: train, infer or both")
    ap.add_argument("--repeats", type=int, default=1, help="PyTorch and every variant this many times")
    ap.add_argument(
        "--torch-dtypes",
        type=lambda s: [x for x in s.split(",") if x],
        default=["float32"],
        help=f"PyTorch peers, float32 first (of {TORCH_DTYPES}; bfloat16: autocast)",
    )
    ap.add_argument("--timeout-s", type=float, default=1200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.torch_dtypes[0] != "float32" or set(args.torch_dtypes) - set(TORCH_DTYPES):
        ap.error(f"--torch-dtypes: float32 first, then some of {TORCH_DTYPES}; got {args.torch_dtypes}")
    names = args.variants.split(",")
    for name in names:
        variant(name)  # fails early on an unknown name
    result = {
        "benchmark": "cpu_levers",
        "size": args.size,
        "batch": args.batch,
        "cores": os.cpu_count(),
        "environment": environment(None, None),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "rows": {},
    }
    print(f"{'preset':8s} {'variant':40s} " + " ".join(f"{p:>13s}" for p in PATHS) + "  (img/s; x PyTorch)")
    for preset in args.presets.split(","):
        _measure(args, preset, names, result)
    write_result(Path(args.out), result)
    return 0


# --------------------------------------------------------------------------------------
# model: the levers a model field or an argument switches, in one process (was levers.py)
# --------------------------------------------------------------------------------------
TRAIN_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "float32": {"dtype": "float32"},
    "single_step": {"num_steps": 1},
    "no_donate": {"donate": False},
    "zero_insertion": {"up_method": "zero_insertion"},
    "interleave": {"up_method": "interleave"},
    "matmul": {"up_method": "matmul"},
    "subpixel": {"up_method": "subpixel"},
    "custom_vjp": {"up_method": "custom_vjp"},
    "nchw": {"layout": "NCHW"},
    "xla_grad": {"gradient": "xla"},
    "explicit_grad": {"gradient": "explicit"},
}
INFER_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "float32": {"dtype": "float32"},
    "fold_bn": {"fold_bn": True},
    "zero_insertion": {"up_method": "zero_insertion"},
    "interleave": {"up_method": "interleave"},
    "matmul": {"up_method": "matmul"},
    "subpixel": {"up_method": "subpixel"},
    "subpixel_fold_bn": {"up_method": "subpixel", "fold_bn": True},
    "nchw": {"layout": "NCHW"},
}
MODEL_SWITCHES = ("up_method", "layout", "gradient", "dropout_bits")


def _model_fields(args: argparse.Namespace, switch: dict[str, Any]) -> dict[str, Any]:
    """The architecture overrides of a variant: ``--model`` plus its model-field switches."""
    return {**args.model, **{k: switch[k] for k in MODEL_SWITCHES if k in switch}}


def train_variant(
    args: argparse.Namespace, host: dict[str, np.ndarray], switch: dict[str, Any], flops: Any
) -> dict[str, Any]:
    dtype = switch.get("dtype", args.dtype)
    fields = _model_fields(args, switch)
    model = create_unet(args.preset, **fields, dtype=DTYPES[dtype])
    n = host["images"].shape[0]
    data = jax.device_put(
        DeviceData(jnp.asarray(host["images"]), jnp.asarray(host["masks"]), jnp.asarray(host["labels"]))
    )
    tx = make_optimizer(TrainConfig(preset=args.preset, batch_size=args.batch), max(1, n // args.batch))
    sample = make_sampler(args.batch, n, None)
    data_key, dropout_key, init_key = jax.random.split(jax.random.key(0), 3)
    if switch.get("dropout_prng", "threefry2x32") != "threefry2x32":  # as unet_jax.train.steps.run_keys
        dropout_key = jax.random.key(0, impl=switch["dropout_prng"])
    state = create_train_state(model, tx, init_key, (1, args.size, args.size, model.in_channels))
    steps_fn = get_train_steps(switch.get("donate", True))
    num_steps = switch.get("num_steps", args.steps)
    holder = {"state": state, "step": 0}
    del state

    def run(dispatches: int) -> None:
        st = holder["state"]
        for _ in range(dispatches):
            st, metrics = steps_fn(
                st,
                data,
                data_key,
                dropout_key,
                jnp.asarray(holder["step"], jnp.int32),
                num_steps=num_steps,
                sample=sample,
                loss_fn=get_loss("bce_dice"),
                threshold=0.5,
                mesh=None,
            )
            holder["step"] += num_steps
        holder["state"] = st
        jax.block_until_ready((st, metrics))

    t0 = time.perf_counter()
    run(1)
    compile_s = time.perf_counter() - t0
    if args.warmup:
        run(args.warmup)
    dispatches = 1 if num_steps > 1 else pick_steps(run, args.window_s, args.steps, args.max_steps)
    out = stats(time_windows(run, dispatches, args.windows), dispatches * num_steps, args.batch, flops.train, args.peak)
    out.update(
        compile_s=round(compile_s, 2),
        steps_per_dispatch=num_steps,
        dtype=dtype,
        donated=switch.get("donate", True),
        up_method=fields.get("up_method", "auto"),
        layout=fields.get("layout", "NHWC"),
        gradient=fields.get("gradient", "auto"),
        dropout_prng=switch.get("dropout_prng", "threefry2x32"),
        dropout_bits=fields.get("dropout_bits", 32),
    )
    holder.clear()  # the state's buffers go before the next variant
    gc.collect()
    return out


def infer_variant(
    args: argparse.Namespace, host: dict[str, np.ndarray], switch: dict[str, Any], flops: Any, reference: dict[str, Any]
) -> dict[str, Any]:
    dtype = switch.get("dtype", args.dtype)
    base = create_unet(args.preset, **args.model)
    if "variables" not in reference:  # the same (float32) parameters for every variant
        x = jnp.zeros((1, args.size, args.size, base.in_channels))
        variables = jax.jit(lambda k: base.init(k, x, train=False))(jax.random.key(1))
        # Running statistics that are not the identity, so folding has something to fold.
        variables = {
            "params": variables["params"],
            "batch_stats": jax.tree.map(
                lambda v: v + 0.1 * jnp.abs(jax.random.normal(jax.random.key(2), v.shape)),
                variables.get("batch_stats", {}),
            ),
        }
        reference["variables"] = variables
    fields = _model_fields(args, switch)
    model = create_unet(args.preset, **fields, dtype=DTYPES[dtype])
    variables = reference["variables"]
    if switch.get("fold_bn"):
        model, variables = fold_batch_norm(model, variables)
    images = jax.device_put(jnp.asarray(host["images"][: args.batch], jnp.float32) / 255.0)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    t0 = time.perf_counter()
    y = jax.block_until_ready(apply(variables, images))
    compile_s = time.perf_counter() - t0

    def run(k: int) -> None:
        for _ in range(k):
            out = apply(variables, images)
        jax.block_until_ready(out)

    if args.warmup:
        run(args.warmup)
    steps = pick_steps(run, args.window_s, args.steps, args.max_steps)
    out = stats(time_windows(run, steps, args.windows), steps, args.batch, flops.forward, args.peak)
    y = np.asarray(y, np.float32)
    if "output" not in reference:
        reference["output"] = y
    out.update(
        compile_s=round(compile_s, 2),
        dtype=dtype,
        fold_bn=bool(switch.get("fold_bn")),
        up_method=fields.get("up_method", "auto"),
        layout=fields.get("layout", "NHWC"),
        max_abs_diff_vs_baseline=float(np.max(np.abs(y - reference["output"]))),
        max_abs_baseline=float(np.max(np.abs(reference["output"]))),
    )
    return out


def _model_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.cpu_levers model",
        description=model_main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--preset", default="padded")
    ap.add_argument("--model", type=parse_fields, default={}, help="architecture overrides")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument(
        "--steps", type=int, default=None, help="steps per scanned dispatch = per window (default: ~--window-s)"
    )
    ap.add_argument("--window-s", type=float, default=None, help="default 0.5 (GPU), 2 (CPU)")
    ap.add_argument("--max-steps", type=int, default=100)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--train", type=lambda s: [x for x in s.split(",") if x], default=list(TRAIN_VARIANTS))
    ap.add_argument("--infer", type=lambda s: [x for x in s.split(",") if x], default=list(INFER_VARIANTS))
    ap.add_argument("--peak", type=float, default=None, help="bf16 peak TFLOP/s (for shares)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip variants after this")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def model_main(argv: list[str] | None = None) -> int:
    """The JAX training step's and inference's levers, each switched alone, in one process.

        python -m benchmarks.cpu_levers model --out levers.json              # padded, batch 32, bf16 (GPU)
        python -m benchmarks.cpu_levers model --preset seed --size 32 --batch 2 --model features=2,depth=1 \\
            --windows 2 --steps 2 --out /tmp/levers.json           # the CPU dry run (seconds)

    Every variant differs from the baseline (``--dtype`` compute, ``--steps``-step scanned
    dispatch of ``unet_jax.train.steps.train_steps``, donated state, NHWC, up-convolutions by
    ``UNet.up_method='auto'``, batch norm as trained) in one switch:

    * train: ``float32`` compute; ``single_step`` (one step per dispatch); ``no_donate`` (the
      state's buffers not donated); the up-convolution's method (``UNet.up_method``, issue
      31): ``zero_insertion`` (lhs-dilated convolution), ``interleave`` (``lax.pad`` interior
      zeros + a stride-1 convolution), ``matmul`` (kernel = stride only: one matrix product
      per pixel; an error row for the seed preset's 3x3), ``subpixel`` (one convolution on
      the input grid + depth-to-space), ``custom_vjp`` (its own VJP); ``nchw``
      (``UNet.layout``: activations channels-first inside the network); ``xla_grad`` and
      ``explicit_grad`` (``UNet.gradient``: JAX's own convolution gradients, or the written-out
      canonical ones of unet_jax.layers.conv_grad; the baseline's ``'auto'`` is explicit on the CPU,
      JAX's own elsewhere);
    * inference: ``float32``; ``fold_bn`` (``unet_jax.models.fold_batch_norm``: batch norm
      folded into the convolutions); ``zero_insertion``, ``interleave``, ``matmul``,
      ``subpixel``; ``subpixel_fold_bn``; ``nchw``.

    Each switch is proven on the CPU to give the baseline's numbers (tests/test_levers.py,
    tests/test_train.py for steps per dispatch); inference variants also record their largest
    difference from the baseline's output on the same parameters. The layout lever changes the
    logical layout only; XLA's layout assignment still chooses the physical one per backend
    (on GPU usually NHWC for bf16 tensor cores), so it measures what the logical choice costs.
    Variants run in the order above until ``--budget-s``; the JSON is rewritten after each.
    """
    t_start = time.perf_counter()
    args = _model_args(argv)
    backend = jax.default_backend()
    if args.window_s is None:
        args.window_s = 2.0 if backend == "cpu" else 0.5
    unknown = (set(args.train) - set(TRAIN_VARIANTS)) | (set(args.infer) - set(INFER_VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}")
    flops = preset_flops(args.preset, args.size, **args.model)
    channels = create_unet(args.preset, **args.model).in_channels
    host = make_host_data(2 * args.batch, args.size, channels)
    if args.steps is None:  # a fixed number of steps per dispatch for every train variant
        args.steps = 20 if backend != "cpu" else 2
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "levers",
        "schema": 1,
        "preset": args.preset,
        "model_overrides": args.model,
        "size": args.size,
        "batch": args.batch,
        "dtype": args.dtype,
        "backend": backend,
        "device": str(jax.devices()[0].device_kind),
        "args": {k: v for k, v in vars(args).items()},
        "train_flops_per_image": flops.train,
        "forward_flops_per_image": flops.forward,
        "environment": environment(None, None),
        "train": {},
        "infer": {},
    }

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_result(out_path, result)

    reference: dict[str, Any] = {}
    jobs = [("train", name) for name in args.train] + [("infer", name) for name in args.infer]
    for kind, name in jobs:
        elapsed = time.perf_counter() - t_start
        if args.budget_s is not None and elapsed > args.budget_s:
            result[kind][name] = {"skipped": f"time budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"}
            save()
            continue
        try:
            if kind == "train":
                row = train_variant(args, host, TRAIN_VARIANTS[name], flops)
            else:
                row = infer_variant(args, host, INFER_VARIANTS[name], flops, reference)
        except Exception as e:  # noqa: BLE001 - record and go on
            row = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
        result[kind][name] = row
        save()
        print(
            f"{kind:5s} {name:18s} "
            + (
                f"{row['images_per_s']:10.1f} img/s  compile {row['compile_s']:.1f} s"
                if "images_per_s" in row
                else str(row)
            ),
            flush=True,
        )
    for kind in ("train", "infer"):
        base = result[kind].get("baseline", {}).get("images_per_s")
        for row in result[kind].values():
            if base and "images_per_s" in row:
                row["vs_baseline"] = round(row["images_per_s"] / base, 3)
    save()
    print(f"wrote {out_path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.cpu_levers [flags] ...``: the XLA-flag levers (:func:`main`, the
    default); ``python -m benchmarks.cpu_levers model ...``: the model levers (:func:`model_main`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["model"]:
        return model_main(argv[1:])
    return main(argv[1:] if argv[:1] == ["flags"] else argv)


if __name__ == "__main__":
    sys.exit(cli())
