"""Training-step and inference throughput of the U-Net presets, JAX against a PyTorch peer.

    python -m benchmarks.throughput                        # the full comparison (GPU)
    python -m benchmarks.throughput --size 64 --batches 2 --windows 2 --presets seed \\
        --dtypes float32                                    # a CPU smoke run (seconds)

For every (preset, batch, dtype) row, in one process on one device:

* JAX, the project's own code: ``unet_jax.train.steps.train_steps`` (state donated, batch
  drawn on device by ``unet_jax.data.make_sampler`` from device-resident uint8 data, no
  augmentation), once with ``num_steps = 1`` per dispatch (``train_single``) and once with
  many steps scanned in one dispatch (``train_scan``, the default path on accelerators),
  and jitted inference (``model.apply(train=False)``);
* the PyTorch peer (``benchmarks/torch_peer.py``: torch.compile, bf16 autocast,
  channels-last, cuDNN benchmark mode, Adam), on the same images, parameter counts checked
  equal to the JAX model's before anything is timed;

images/s = median over ``--windows`` timed windows (warm-up and compilation excluded,
device synchronised at the end of every window), analytic FLOPs per image
(``benchmarks/flops.py``: convolutions + transposed convolutions on the input grid;
training = 3x forward), achieved TFLOP/s, its share of the bf16 matrix peak measured in the
same run (an n x n x n bf16 matmul, JAX and PyTorch, the larger counts), and the ratio
JAX/PyTorch per row. Rows run bf16 first; ``--budget-s`` skips the rows that would start
after the budget (recorded as skipped). The JSON file (card, versions, command, every
window) is rewritten after each row, so a run cut short keeps what it measured.

PyTorch runs first in every row and releases its cached memory before JAX runs: JAX is
started without preallocation (``XLA_PYTHON_CLIENT_PREALLOCATE=false``) so the two share
the card, and JAX's allocator keeps what it grew.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Before jax is imported: let JAX and PyTorch share one GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from benchmarks.flops import preset_flops  # noqa: E402
from benchmarks.harness import REPO, environment, time_windows, write_result  # noqa: E402
from unet_jax.config import TrainConfig  # noqa: E402
from unet_jax.data.augment import DeviceData, make_sampler  # noqa: E402
from unet_jax.losses import get_loss  # noqa: E402
from unet_jax.models import create_unet, fold_batch_norm  # noqa: E402
from unet_jax.train.state import create_train_state, make_optimizer  # noqa: E402
from unet_jax.train.steps import BATCH_AXIS, make_mesh, run_keys, train_steps  # noqa: E402

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def stats(
    seconds: list[float], steps: int, batch: int, flops_per_image: float | None, peak_tflops: float | None
) -> dict[str, Any]:
    ips = [steps * batch / s for s in seconds]
    med = statistics.median(ips)
    res: dict[str, Any] = {
        "images_per_s": round(med, 2),
        "images_per_s_min": round(min(ips), 2),
        "images_per_s_max": round(max(ips), 2),
        "steps_per_window": steps,
        "window_s": [round(s, 5) for s in seconds],
    }
    if flops_per_image:
        tflops = med * flops_per_image / 1e12
        res["tflops"] = round(tflops, 3)
        if peak_tflops:
            res["share_of_bf16_peak"] = round(tflops / peak_tflops, 4)
    return res


def pick_steps(run: Callable[[int], Any], window_s: float, fixed: int | None, max_steps: int) -> int:
    """Steps per window: ``fixed``, or enough for about ``window_s`` seconds."""
    if fixed:
        return fixed
    t0 = time.perf_counter()
    run(1)
    one = time.perf_counter() - t0
    return int(min(max_steps, max(2, math.ceil(window_s / max(one, 1e-6)))))


# --------------------------------------------------------------------------------------
# Matrix peak
# --------------------------------------------------------------------------------------
def jax_matmul_tflops(n: int, dtype: Any, windows: int, window_s: float) -> float:
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))

    def run(k: int) -> None:
        for _ in range(k):
            out = f(a, b)
        jax.block_until_ready(out)

    k = pick_steps(run, window_s, None, 10_000)
    secs = time_windows(run, k, windows)
    return 2 * n**3 * k / statistics.median(secs) / 1e12


def torch_matmul_tflops(torch: Any, device: Any, n: int, dtype: Any, windows: int, window_s: float) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)

    def run(k: int) -> None:
        for _ in range(k):
            out = a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        del out

    run(2)
    k = pick_steps(run, window_s, None, 10_000)
    secs = time_windows(run, k, windows)
    return 2 * n**3 * k / statistics.median(secs) / 1e12


# --------------------------------------------------------------------------------------
# Data shared by both frameworks
# --------------------------------------------------------------------------------------
def make_host_data(n: int, size: int, channels: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1)) * size
    r = rng.uniform(0.05, 0.25, (n, 1, 1)) * size
    masks = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).astype(np.uint8)[..., None]
    return {"images": images, "masks": masks, "labels": np.zeros(n, np.int32)}


# --------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------
def bench_jax(
    preset: str,
    batch: int,
    dtype: str,
    size: int,
    host: dict[str, np.ndarray],
    args: argparse.Namespace,
    flops: Any,
    peak: float | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"compile_s": {}}
    model = create_unet(preset, **args.model, dtype=DTYPES[dtype])
    n = host["images"].shape[0]
    # --mesh: data-parallel over every local device (replicated data and state, the batch
    # split along the mesh), as the training loop runs; otherwise one device.
    mesh = make_mesh() if args.mesh else None
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh is not None else jax.devices()[0]
    # Held in a dict, not a local, so the training closures can read it and the end of the
    # function can still drop the device copy (a deleted closure variable is a lint error).
    device = {
        "data": jax.device_put(
            DeviceData(jnp.asarray(host["images"]), jnp.asarray(host["masks"]), jnp.asarray(host["labels"])), replicated
        )
    }
    config = TrainConfig(preset=preset, batch_size=batch)
    tx = make_optimizer(config, max(1, n // batch))
    loss_fn = get_loss("bce_dice")
    sample = make_sampler(batch, n, None)  # gather + /255, no augmentation
    data_key, dropout_key, init_key = jax.random.split(jax.random.key(args.seed), 3)
    if args.dropout_prng != "threefry2x32":  # the training loop's choice (unet_jax.train.steps.run_keys)
        dropout_key = run_keys(args.seed, args.dropout_prng)[1]
    modes = args.modes
    counter = {"step": 0}

    if "train" in modes:
        state = jax.device_put(create_train_state(model, tx, init_key, (1, size, size, model.in_channels)), replicated)
        holder = {"state": state}

        def make_run(num_steps: int) -> Callable[[int], None]:
            def run(dispatches: int) -> None:
                st = holder["state"]
                for _ in range(dispatches):
                    start = jnp.asarray(counter["step"], jnp.int32)
                    st, metrics = train_steps(
                        st,
                        device["data"],
                        data_key,
                        dropout_key,
                        start,
                        num_steps=num_steps,
                        sample=sample,
                        loss_fn=loss_fn,
                        threshold=0.5,
                        mesh=mesh,
                    )
                    counter["step"] += num_steps
                holder["state"] = st
                jax.block_until_ready((st, metrics))

            return run

        paths = [p for p in args.jax_paths if p in ("single", "scan")]
        single = make_run(1)
        t0 = time.perf_counter()
        single(1)
        out["compile_s"]["train_single"] = round(time.perf_counter() - t0, 2)
        single(args.warmup)
        steps = pick_steps(single, args.window_s, args.steps, args.max_steps)
        if "single" in paths:
            out["train_single"] = stats(time_windows(single, steps, args.windows), steps, batch, flops.train, peak)
        if "scan" in paths:
            scan = make_run(steps)
            t0 = time.perf_counter()
            scan(1)
            out["compile_s"]["train_scan"] = round(time.perf_counter() - t0, 2)
            out["train_scan"] = stats(time_windows(scan, 1, args.windows), steps, batch, flops.train, peak)
            out["train_scan"]["steps_per_dispatch"] = steps
            out["train_scan"]["dispatches_per_window"] = 1
        del holder, state
    if "infer" in modes:
        variables = jax.device_put(
            model.init(init_key, jnp.zeros((1, size, size, model.in_channels)), train=False), replicated
        )
        split = NamedSharding(mesh, PartitionSpec(BATCH_AXIS)) if mesh is not None else replicated
        images = jax.device_put(jnp.asarray(host["images"][:batch], jnp.float32) / 255.0, split)
        infer_model = model
        if args.fold_bn:  # the lever: batch norm folded into the convolutions (unet_jax.models)
            infer_model, variables = fold_batch_norm(model, variables)
        apply = jax.jit(lambda v, x: infer_model.apply(v, x, train=False))

        def infer(k: int) -> None:
            for _ in range(k):
                y = apply(variables, images)
            jax.block_until_ready(y)

        t0 = time.perf_counter()
        infer(1)
        out["compile_s"]["infer"] = round(time.perf_counter() - t0, 2)
        infer(args.warmup)
        steps = pick_steps(infer, args.window_s, args.steps, args.max_steps)
        out["infer"] = stats(time_windows(infer, steps, args.windows), steps, batch, flops.forward, peak)
        del variables, images
    device.clear()
    gc.collect()
    return out


# --------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------
def bench_torch(
    torch: Any,
    device: Any,
    preset: str,
    batch: int,
    dtype: str,
    host: dict[str, np.ndarray],
    args: argparse.Namespace,
    flops: Any,
    peak: float | None,
) -> dict[str, Any]:
    from benchmarks.torch_peer import PeerRunner

    compile_opt: bool | str = {"auto": "auto", "on": True, "off": False}[args.torch_compile]
    runner = PeerRunner(
        preset,
        device,
        dtype,
        compile=compile_opt,
        compile_mode=args.torch_compile_mode,
        channels_last=not args.torch_no_channels_last,
        **args.model,
    )
    x = runner.to_input(torch.from_numpy(host["images"][:batch]).float() / 255.0)
    y = torch.from_numpy(host["masks"][:batch]).float().permute(0, 3, 1, 2).contiguous()
    y = y.to(device)
    out: dict[str, Any] = {}
    try:
        if "train" in args.modes:
            run = runner.train_callable(x, y)
            run(args.warmup)
            steps = pick_steps(run, args.window_s, args.steps, args.max_steps)
            out["train"] = stats(time_windows(run, steps, args.windows), steps, batch, flops.train, peak)
        if "infer" in args.modes:
            run = runner.infer_callable(x)
            run(args.warmup)
            steps = pick_steps(run, args.window_s, args.steps, args.max_steps)
            out["infer"] = stats(time_windows(run, steps, args.windows), steps, batch, flops.forward, peak)
    finally:
        out["info"] = runner.info()
        del runner, x, y
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------
def _f(v: Any, fmt: str = "{:,.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _ips(d: dict | None, key: str) -> float | None:
    return None if not d or key not in d else d[key]["images_per_s"]


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "preset",
        "batch",
        "dtype",
        "jax train scan",
        "jax train 1/disp",
        "torch train",
        "ratio",
        "TFLOP/s",
        "%peak",
        "jax infer",
        "torch infer",
        "ratio",
    )
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in rows:
        if r.get("skipped"):
            lines.append(
                " | ".join(
                    [r["preset"], str(r["batch"]), r["dtype"], f"skipped: {r['skipped']}"] + [""] * (len(head) - 4)
                )
            )
            continue
        j, t, d = r.get("jax", {}), r.get("torch", {}), r.get("derived", {})
        best = j.get(d.get("jax_train_headline") or "", {})
        lines.append(
            " | ".join(
                [
                    r["preset"],
                    str(r["batch"]),
                    r["dtype"],
                    _f(_ips(j, "train_scan")),
                    _f(_ips(j, "train_single")),
                    _f(_ips(t, "train")),
                    _f(d.get("ratio_train"), "{:.2f}x"),
                    _f(best.get("tflops"), "{:.1f}"),
                    _f(None if best.get("share_of_bf16_peak") is None else 100 * best["share_of_bf16_peak"], "{:.1f}%"),
                    _f(_ips(j, "infer")),
                    _f(_ips(t, "infer")),
                    _f(d.get("ratio_infer"), "{:.2f}x"),
                ]
            )
        )
    return "\n".join(lines)


def derive(row: dict[str, Any], backend: str) -> dict[str, Any]:
    j, t = row.get("jax", {}), row.get("torch", {})
    # The project's default dispatch path: a whole epoch per dispatch on accelerators,
    # one step per dispatch on CPU (unet_jax.train.steps.default_steps_per_dispatch).
    headline = "train_single" if backend == "cpu" else "train_scan"
    if headline not in j:
        headline = "train_scan" if "train_scan" in j else "train_single"
    d: dict[str, Any] = {"jax_train_headline": headline if headline in j else None}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a / b, 3)

    tt = _ips(t, "train")
    d["ratio_train"] = ratio(_ips(j, headline), tt)
    d["ratio_train_scan"] = ratio(_ips(j, "train_scan"), tt)
    d["ratio_train_single"] = ratio(_ips(j, "train_single"), tt)
    d["ratio_infer"] = ratio(_ips(j, "infer"), _ips(t, "infer"))
    return d


# --------------------------------------------------------------------------------------
def parse_fields(text: str) -> dict[str, Any]:
    """``"features=4,depth=2"`` -> ``{"features": 4, "depth": 2}`` (values as Python literals)."""
    import ast

    out: dict[str, Any] = {}
    for item in (x for x in text.split(",") if x):
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    csv = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--presets", type=csv, default=["seed", "padded"])
    ap.add_argument(
        "--model",
        type=parse_fields,
        default={},
        help="architecture overrides for every preset, both frameworks (e.g. "
        "features=4,depth=2 for the CPU dry run of benchmarks/gpu_run.py)",
    )
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in csv(s)], default=[32, 128])
    ap.add_argument(
        "--dtypes", type=csv, default=["bfloat16", "float32"], help="run in this order (bf16 first: the targets)"
    )
    ap.add_argument("--modes", type=csv, default=["train", "infer"])
    ap.add_argument("--frameworks", type=csv, default=["jax", "torch"])
    ap.add_argument(
        "--jax-paths",
        type=csv,
        default=["single", "scan"],
        help="single: one step per dispatch; scan: many steps per dispatch",
    )
    ap.add_argument("--windows", type=int, default=5, help="timed windows (median reported)")
    ap.add_argument(
        "--window-s", type=float, default=None, help="target seconds per window (default 0.5 on accelerators, 2 on CPU)"
    )
    ap.add_argument("--steps", type=int, default=None, help="fixed steps per window (default: from --window-s)")
    ap.add_argument("--max-steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after compilation")
    ap.add_argument(
        "--dataset-size", type=int, default=None, help="device-resident images for the JAX sampler (default 2 x batch)"
    )
    ap.add_argument(
        "--matmul-size", type=int, default=None, help="n of the n^3 bf16 peak matmul (default 8192 GPU, 1024 CPU)"
    )
    ap.add_argument(
        "--torch-compile",
        choices=("auto", "on", "off"),
        default=None,
        help="auto: try, fall back to eager with the reason recorded (default "
        "on accelerators); off: eager (default on CPU, where Inductor "
        "takes minutes per graph on 2 cores)",
    )
    ap.add_argument("--torch-compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--torch-no-channels-last", action="store_true")
    ap.add_argument("--budget-s", type=float, default=None, help="skip rows that would start after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fold-bn", action="store_true", help="JAX inference: batch norm folded into the convolutions")
    ap.add_argument(
        "--dropout-prng",
        choices=("threefry2x32", "rbg", "unsafe_rbg"),
        default="threefry2x32",
        help="JAX: the dropout key's implementation (TrainConfig.dropout_prng)",
    )
    ap.add_argument(
        "--mesh",
        action="store_true",
        help="JAX data-parallel over every local device (e.g. two CPU devices with "
        "XLA_FLAGS=--xla_force_host_platform_device_count=2)",
    )
    ap.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/throughput_<backend>_<UTC time>.json)"
    )
    ap.add_argument("--tag", default=None, help="a label stored in the JSON")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    backend = jax.default_backend()
    if args.window_s is None:
        args.window_s = 2.0 if backend == "cpu" else 0.5
    if args.matmul_size is None:
        args.matmul_size = 1024 if backend == "cpu" else 8192
    if args.torch_compile is None:
        args.torch_compile = "off" if backend == "cpu" else "auto"
    unknown = set(args.dtypes) - set(DTYPES)
    if unknown:
        raise SystemExit(f"unknown dtype(s) {sorted(unknown)}; expected {sorted(DTYPES)}")

    torch = torch_device = None
    torch_error = None
    if "torch" in args.frameworks:
        try:
            import torch  # noqa: F811

            from benchmarks.torch_peer import check_param_counts, torch_flops
        except Exception as e:  # noqa: BLE001
            torch, torch_error = None, f"{type(e).__name__}: {e}"
            print(f"PyTorch peer unavailable ({torch_error}); JAX only", flush=True)
        if torch is not None:
            torch_device = torch.device("cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu")
            if backend == "gpu" and torch_device.type != "cuda":
                raise SystemExit("JAX sees a GPU but PyTorch does not: the peer would not run on the same device")
            torch.backends.cudnn.benchmark = True

    env = environment(torch, torch_device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_path = Path(args.out) if args.out else (REPO / "benchmarks" / "results" / f"throughput_{backend}_{stamp}.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"device: JAX {env['jax_backend']} {env['jax_device']}; PyTorch "
        f"{env.get('torch', {}).get('name', torch_device)}",
        flush=True,
    )

    result: dict[str, Any] = {
        "benchmark": "throughput",
        "schema": 1,
        "tag": args.tag,
        "time_utc": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: v for k, v in vars(args).items()},
        "card": env.get("torch", {}).get("name") or env["jax_device"],
        "environment": env,
        "torch_error": torch_error,
        "notes": {
            "images_per_s": "median over timed windows; compilation and warm-up excluded; "
            "each window ends with block_until_ready / cuda.synchronize",
            "jax_train": "unet_jax.train.steps.train_steps with on-device sampling (no "
            "augmentation; loss bce_dice; Adam eps 1e-7; metrics computed in "
            "the step); train_single: num_steps=1 per dispatch; train_scan: "
            "steps_per_dispatch steps in one lax.scan dispatch",
            "torch_train": "compiled forward+loss (AOTAutograd backward), eager Adam "
            "(fused on CUDA), bf16 autocast, channels-last, cudnn.benchmark; "
            "no metrics",
            "flops": "analytic, benchmarks/flops.py: conv + transposed conv (input grid), training = 3 x forward",
            "float32": "JAX: default precision; PyTorch: default TF32 settings recorded in environment.torch",
        },
    }

    # Parameter-count equality (the peer must be the same architecture) and FLOPs.
    presets: dict[str, Any] = {}
    for preset in args.presets:
        fc = preset_flops(preset, args.size, **args.model)
        info: dict[str, Any] = {"flops": fc.summary()}
        if torch is not None:
            info["param_counts"] = check_param_counts(preset, **args.model)  # raises on mismatch
            tf = torch_flops(preset, args.size, **args.model)
            info["flops"]["torch_flop_counter_forward_per_image"] = tf
            if tf != fc.forward:
                raise SystemExit(f"{preset}: torch FlopCounter {tf} != analytic {fc.forward}")
        presets[preset] = info
        print(
            f"{preset} @ {args.size}: {fc.forward / 1e9:.3f} GFLOP forward, "
            f"{fc.train / 1e9:.2f} GFLOP per training image"
            + (f"; params {info['param_counts']['jax_params']:,} equal in both" if torch is not None else ""),
            flush=True,
        )
    result["presets"] = presets

    # Matrix peak in this run.
    peak: dict[str, Any] = {"n": args.matmul_size}
    # Four significant digits: a small matrix on a CPU measures thousandths of a TFLOP/s.
    sig = lambda x: float(f"{x:.4g}")  # noqa: E731
    peak["jax_bf16_tflops"] = sig(jax_matmul_tflops(args.matmul_size, jnp.bfloat16, args.windows, args.window_s))
    peak["jax_f32_tflops"] = sig(jax_matmul_tflops(args.matmul_size, jnp.float32, args.windows, args.window_s))
    if torch is not None:
        peak["torch_bf16_tflops"] = sig(
            torch_matmul_tflops(torch, torch_device, args.matmul_size, torch.bfloat16, args.windows, args.window_s)
        )
    peak["bf16_peak_tflops"] = max(v for k, v in peak.items() if k.endswith("bf16_tflops"))
    result["matmul_peak"] = peak
    bf16_peak = peak["bf16_peak_tflops"]
    print(
        f"bf16 matmul peak ({args.matmul_size}^3): {bf16_peak:.2f} TFLOP/s "
        f"{ {k: v for k, v in peak.items() if k.endswith('tflops')} }",
        flush=True,
    )

    rows: list[dict[str, Any]] = []
    result["rows"] = rows

    def save() -> None:
        result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        write_result(out_path, result)

    hosts: dict[tuple[int, int, int], dict[str, np.ndarray]] = {}
    for dtype in args.dtypes:
        for batch in args.batches:
            for preset in args.presets:
                row: dict[str, Any] = {"preset": preset, "batch": batch, "dtype": dtype, "size": args.size}
                rows.append(row)
                elapsed = time.perf_counter() - t_start
                if args.budget_s is not None and elapsed > args.budget_s:
                    row["skipped"] = f"time budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"
                    save()
                    continue
                channels = create_unet(preset, **args.model).in_channels
                n = args.dataset_size or 2 * batch
                key = (n, args.size, channels)
                if key not in hosts:
                    hosts.clear()
                    hosts[key] = make_host_data(n, args.size, channels, args.seed)
                fc = preset_flops(preset, args.size, **args.model)
                row["train_flops_per_image"] = fc.train
                row["forward_flops_per_image"] = fc.forward
                t_row = time.perf_counter()
                if torch is not None:
                    try:
                        row["torch"] = bench_torch(
                            torch, torch_device, preset, batch, dtype, hosts[key], args, fc, bf16_peak
                        )
                    except Exception as e:  # noqa: BLE001 - OOM or compiler failure: record
                        row["torch_error"] = f"{type(e).__name__}: {str(e)[:800]}"
                        if torch_device.type == "cuda":
                            torch.cuda.empty_cache()
                if "jax" in args.frameworks:
                    try:
                        row["jax"] = bench_jax(preset, batch, dtype, args.size, hosts[key], args, fc, bf16_peak)
                    except Exception as e:  # noqa: BLE001
                        row["jax_error"] = f"{type(e).__name__}: {str(e)[:800]}"
                row["derived"] = derive(row, backend)
                row["row_s"] = round(time.perf_counter() - t_row, 1)
                save()
                print(table([row]).splitlines()[-1] + f"   ({row['row_s']} s)", flush=True)
                for k in ("torch_error", "jax_error"):
                    if k in row:
                        print(f"  {k}: {row[k]}", flush=True)

    save()
    print()
    print(
        f"{result['card']} ({backend}), {args.size}x{args.size}, images/s (median of "
        f"{args.windows} windows); TFLOP/s and %peak of the JAX headline train path vs "
        f"bf16 matmul peak {bf16_peak:.1f} TFLOP/s"
    )
    print(table(rows))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
