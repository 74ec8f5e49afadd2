"""The CPU levers that need a fresh process (XLA flags are read once, when jax starts):
threading and host devices, each against the PyTorch peer measured in the same run.

    python -m benchmarks.cpu_levers --presets seed,padded --size 128 --batch 16 \\
        --out benchmarks/results/cpu_levers_128.json

Every variant runs ``benchmarks/throughput.py`` (JAX training step one step per dispatch
and scanned, inference; float32) in its own process with its own ``XLA_FLAGS``:

* ``default``: XLA:CPU as it starts, one device using every core;
* ``eigen_1_thread``: ``--xla_cpu_multi_thread_eigen=false`` (convolutions and matrix
  products on one thread each);
* ``two_devices``: ``--xla_force_host_platform_device_count=2`` and ``--mesh``, the batch
  split over two CPU devices (data parallel, as the training loop runs on every device);
* ``two_devices_eigen_1_thread``: both, one thread per device.

PyTorch (eager, channels-last, ``torch.set_num_threads`` = the cores) runs once, in its own
process. Prints one table row per (preset, variant) with images/s and the ratio to
PyTorch; the JSON holds every window. Run it on a quiet machine: the variants are timed one
after another, not interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
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
PATHS = ("train_single", "train_scan", "infer")


def _throughput(args: argparse.Namespace, preset: str, framework: str, flags: str, extra: list[str]) -> dict:
    """One throughput.py process; its JSON row for ``preset``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
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
        return rows[0][framework]


def _ips(row: dict, path: str) -> float | None:
    return row.get(path, {}).get("images_per_s") if isinstance(row.get(path), dict) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="seed,padded")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--model", default="", help="architecture overrides, e.g. features=4,depth=2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout-s", type=float, default=1200)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; expected some of {sorted(VARIANTS)}")
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
    print(f"{'preset':8s} {'variant':28s} " + " ".join(f"{p:>13s}" for p in PATHS) + "  (img/s; x PyTorch)")
    for preset in args.presets.split(","):
        torch_row = _throughput(args, preset, "torch", "", [])
        result["rows"][preset] = {"torch": torch_row}
        peer = {
            "train_single": _ips(torch_row, "train"),
            "train_scan": _ips(torch_row, "train"),
            "infer": _ips(torch_row, "infer"),
        }
        print(f"{preset:8s} {'torch (eager, channels-last)':28s} " + " ".join(f"{(peer[p] or 0):13.1f}" for p in PATHS))
        for name in args.variants.split(","):
            flags, extra = VARIANTS[name]
            row = _throughput(args, preset, "jax", flags, extra)
            for path in PATHS:
                if _ips(row, path) and peer[path]:
                    row[path]["ratio_to_torch"] = round(_ips(row, path) / peer[path], 3)
            result["rows"][preset][name] = {"xla_flags": flags, "args": extra, **row}
            write_result(Path(args.out), result)
            cells = [
                f"{_ips(row, p):6.1f} {row[p]['ratio_to_torch']:5.2f}x"
                if _ips(row, p) and peer[p]
                else f"{'error' if 'error' in row else '-':>13s}"
                for p in PATHS
            ]
            print(f"{preset:8s} {name:28s} " + " ".join(cells), flush=True)
    write_result(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
