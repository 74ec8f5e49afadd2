"""The CPU as two JAX devices: data parallelism across the cores of one host.

XLA:CPU runs one program's operations one after another, each spread over the cores
(convolutions and matrix products by a thread pool, loops split in two); many of a U-Net's
operations are too small or too serial to keep two cores busy. Split into two devices, the
batch halves run side by side, each on its own core, and the training step becomes a
data-parallel step like the accelerators' (batch statistics and gradients reduced over the
mesh, so the numbers are the one-device numbers up to summation order).

Measured (padded 16-wide U-Net, 128x128, batch 16, float32, the 2-core VM, 2026-12-03;
``python -m benchmarks.cpu_levers --presets padded --model features=16``): training
15.7 -> 24.0 img/s (scanned epoch), inference 53.2 -> 88.6 img/s. More than two devices
was not measured (no such machine here), so ``cpu_devices=0`` picks two at most.

The device count is fixed when JAX starts its CPU backend, so it is set before anything
runs (``unet-jax train`` does it from the config); a Python caller calls
:func:`use_cpu_devices` right after importing JAX.
"""

from __future__ import annotations

import os

import jax

__all__ = ["XLA_CPU_FLAGS", "xla_cpu_flags", "cpu_device_count", "use_cpu_devices", "use_xla_cpu_flags"]

# XLA:CPU flags each command sets before JAX starts: the ones measured to help on its path
# (issue 22, benchmarks/cpu_levers.py, RESULTS.md "The CPU at or past PyTorch"; every flag of
# this jaxlib is listed in benchmarks/results/xla_cpu_flags.txt). XNNPACK fusion of dots,
# elementwise ops and reductions sped the training step up 1.6-1.9x for the 64-wide U-Net
# and 7-10% for the seed one (three quiet repeats each), and `unet-jax train --config
# experiments/configs/base_cpu.py` 4% per epoch (15.2 s against 15.8, back to back); it
# slowed inference 4-14%. So training (the demo's too) takes it; predict and evaluate do not.
_YNN_FUSION = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"
XLA_CPU_FLAGS: dict[str, tuple[str, ...]] = {
    "train": (_YNN_FUSION,),
    "demo": (_YNN_FUSION,),
    "predict": (),
    "evaluate": (),
}


# Model families whose training step the YNN fusion slows down, so `unet-jax train` leaves
# it off for them: EfficientNet-Lite0's encoder step (batch 16, 128 px, RGB) took 547 ms
# without it and 2,934 ms with it (issue 29; its depthwise taps and 49 batch norms become
# YNN elementwise/reduce fusions), 1,271 ms with dots alone.
_YNN_SLOWER_FAMILIES = frozenset({"efficientnet"})


def xla_cpu_flags(command: str, family: str | None = None) -> tuple[str, ...]:
    """The XLA:CPU flags ``command`` sets (:data:`XLA_CPU_FLAGS`), for a run of a model of
    ``family`` (a :data:`unet_jax.models.FAMILIES` key; None: the command's default)."""
    if command == "train" and family in _YNN_SLOWER_FAMILIES:
        return tuple(flag for flag in XLA_CPU_FLAGS[command] if flag != _YNN_FUSION)
    return XLA_CPU_FLAGS[command]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_device_count(
    cpu_devices: int,
    batch_sizes: tuple[int, ...],
    distributed: bool = False,
    cores: int | None = None,
    onednn: bool = False,
) -> int:
    """The number of CPU devices for a run: ``cpu_devices`` if set (> 0); otherwise two
    when this process may use two or more cores and every batch size is even (each batch
    is split over the devices), else one. A multi-process run keeps one device per process
    (its processes already divide the cores); so does a run whose convolutions go through
    oneDNN (``onednn``: ``TrainConfig.cpu_bf16``), which threads each call over every core."""
    if cpu_devices > 0:
        return cpu_devices
    cores = _cores() if cores is None else cores
    if distributed or onednn or cores < 2 or any(b % 2 for b in batch_sizes):
        return 1
    return 2


def use_cpu_devices(count: int) -> bool:
    """Split the CPU backend into ``count`` devices. Returns False, changing nothing, when
    the count is already fixed: JAX has started a backend, or ``XLA_FLAGS`` names a host
    device count itself (``--xla_force_host_platform_device_count``)."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return False
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # backends already initialised
        return False
    return True


def use_xla_cpu_flags(flags: tuple[str, ...]) -> list[str]:
    """Add each ``--name=value`` of ``flags`` (e.g. ``XLA_CPU_FLAGS["train"]``) to the
    ``XLA_FLAGS`` environment variable, unless it already names that flag (the user's own
    setting wins). XLA reads the variable once, when its first backend starts, so this must
    run before anything touches one; other backends ignore XLA:CPU flags. Returns the flags
    added."""
    current = os.environ.get("XLA_FLAGS", "")
    named = {item.split("=")[0].lstrip("-") for item in current.split()}
    added = [flag for flag in flags if flag.split("=")[0].lstrip("-") not in named]
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
