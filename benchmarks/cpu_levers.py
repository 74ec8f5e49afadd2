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
  ``--fold-bn``).

PyTorch (eager, channels-last, ``torch.set_num_threads`` = the cores) runs in its own
process before the variants of each repeat. Prints one table row per (preset, variant,
repeat) with images/s and the ratio to that repeat's PyTorch; the JSON holds every window,
the load averages (``os.getloadavg``) before each process, and per variant the median
ratio over the repeats with its min and max. Run it on a quiet machine: the variants are
timed one after another, not interleaved; on a shared one the ratio to the PyTorch of the
same repeat is the comparable figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import REPO, environment, write_result

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
}
PATHS = ("train_single", "train_scan", "infer")


def variant(name: str) -> tuple[str, list[str]]:
    """``base+lever+...``: the base's flags and arguments with each lever's flag added."""
    base, *levers = name.split("+")
    if base not in VARIANTS or any(lever not in LEVERS and lever not in ARG_LEVERS for lever in levers):
        raise SystemExit(
            f"unknown variant {name!r}; expected a base of {sorted(VARIANTS)} and levers of "
            f"{sorted(LEVERS) + sorted(ARG_LEVERS)}"
        )
    flags, extra = VARIANTS[base]
    flags = " ".join([flags, *(LEVERS[lever] for lever in levers if lever in LEVERS)]).strip()
    return flags, [*extra, *(a for lever in levers for a in ARG_LEVERS.get(lever, []))]


def _throughput(args: argparse.Namespace, preset: str, framework: str, flags: str, extra: list[str]) -> dict:
    """One throughput.py process; its JSON row for ``preset``."""
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
        if args.model:
            cmd += ["--model", args.model]
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
    return out


def _row_line(preset: str, name: str, row: dict, peer: dict) -> str:
    cells = [
        f"{_ips(row, p):6.1f} {row[p]['ratio_to_torch']:5.2f}x"
        if _ips(row, p) and peer.get(p)
        else f"{'error' if 'error' in row else '-':>13s}"
        for p in PATHS
    ]
    return f"{preset:8s} {name:40s} " + " ".join(cells) + f"  load {row.get('load_average')}"


def _measure(args: argparse.Namespace, preset: str, names: list[str], result: dict) -> None:
    """Every repeat: PyTorch, then each variant; ratios against that repeat's PyTorch."""
    rows = result["rows"].setdefault(preset, {"torch": [], **{n: {} for n in names}})
    for repeat in range(args.repeats):
        torch_row = _throughput(args, preset, "torch", "", [])
        rows["torch"].append(torch_row)
        peer = {
            "train_single": _ips(torch_row, "train"),
            "train_scan": _ips(torch_row, "train"),
            "infer": _ips(torch_row, "infer"),
        }
        print(
            f"{preset:8s} {f'torch (eager, channels-last) #{repeat + 1}':40s} "
            + " ".join(f"{(peer[p] or 0):13.1f}" for p in PATHS)
            + f"  load {torch_row.get('load_average')}",
            flush=True,
        )
        for name in names:
            flags, extra = variant(name)
            row = _throughput(args, preset, "jax", flags, extra)
            for path in PATHS:
                if _ips(row, path) and peer[path]:
                    row[path]["ratio_to_torch"] = round(_ips(row, path) / peer[path], 3)
            entry = rows[name]
            entry.update(xla_flags=flags, args=extra)
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
    ap.add_argument("--timeout-s", type=float, default=1200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
