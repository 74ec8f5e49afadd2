"""What every benchmark here shares: one timing rule, one environment card, one JSON writer.

Timing (:func:`time_windows`, :func:`median_ms`): a benchmark's unit of work is a callable
that returns only once its results are ready (``jax.block_until_ready`` inside it);
``windows`` calls of it are timed, each a window of ``steps`` steps, and reports are
medians over the windows, compilation and warm-up excluded (untimed calls first).
The card (:func:`environment`): backend, devices, versions, XLA settings, the PyTorch peer's
device when one ran, the git commit, the GPU's name and clocks. Results are written with
:func:`write_result` (atomically: a run cut short never leaves half a file).

Every script here runs from the repository root as ``python -m benchmarks.NAME``.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from unet_jax._io import write_json

__all__ = ["REPO", "time_windows", "median_ms", "environment", "write_result"]

REPO = Path(__file__).resolve().parents[1]


def time_windows(run: Callable[[int], Any], steps: int, windows: int) -> list[float]:
    """Seconds of ``windows`` calls of ``run(steps)`` (each call ends synchronised)."""
    out = []
    for _ in range(windows):
        t0 = time.perf_counter()
        run(steps)
        out.append(time.perf_counter() - t0)
    return out


def median_ms(run: Callable[[], Any], windows: int = 5, calls: int = 3) -> float:
    """Median milliseconds per call of ``run`` over ``windows`` windows of ``calls`` calls,
    after two untimed calls (compilation and warm-up)."""
    run(), run()  # compile and warm up

    def window(n: int) -> None:
        for _ in range(n):
            run()

    return statistics.median(time_windows(window, calls, windows)) / calls * 1e3


# --------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return None


# The host CPU's matrix and vector extensions that decide bfloat16 speed (issue 32).
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_card(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> dict[str, Any] | None:
    """The first CPU's model name and which of ``CPU_ISA_FLAGS`` it has (None off Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name"), "isa": [f for f in CPU_ISA_FLAGS if f in flags]}


def environment(torch: Any, torch_device: Any) -> dict[str, Any]:
    dev = jax.devices()[0]
    env: dict[str, Any] = {
        "cpu": cpu_card(),
        "jax_backend": jax.default_backend(),
        "jax_device": str(dev.device_kind),
        "jax_device_count": jax.device_count(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {
            d: _version(d)
            for d in (
                "jax",
                "jaxlib",
                "flax",
                "optax",
                "numpy",
                "jax-cuda12-plugin",
                "jax-cuda13-plugin",
                "torch",
                "triton",
            )
        },
        "python": platform.python_version(),
        "env": {
            k: os.environ.get(k)
            for k in (
                "XLA_FLAGS",
                "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "JAX_DEFAULT_MATMUL_PRECISION",
                "CUDA_VISIBLE_DEVICES",
            )
        },
        "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
    }
    if torch is not None:
        t: dict[str, Any] = {"device": str(torch_device), "threads": torch.get_num_threads()}
        if torch_device.type == "cuda":
            p = torch.cuda.get_device_properties(torch_device)
            t.update(
                name=p.name,
                multiprocessors=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1),
                cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version(),
                cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                cudnn_benchmark=torch.backends.cudnn.benchmark,
            )
        env["torch"] = t
    try:
        env["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO, text=True, capture_output=True, timeout=10
            ).stdout.strip()
            or None
        )
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, text=True, capture_output=True, timeout=10)
        env["git_dirty_files"] = len(status.stdout.splitlines()) if status.returncode == 0 else None
    except Exception:  # noqa: BLE001
        env["git_commit"] = None
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
            text=True,
            capture_output=True,
            timeout=20,
        )
        if smi.returncode == 0:
            env["nvidia_smi"] = smi.stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return env


def write_result(path: str | os.PathLike, value: Any) -> Path:
    """A benchmark's JSON result at ``path``, written atomically (unet_jax._io)."""
    return write_json(path, value, indent=1)
