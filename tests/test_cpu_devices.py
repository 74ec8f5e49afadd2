"""The CPU split into JAX devices (unet_jax.train.cpu) and the scanned epoch as the default."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from unet_jax.config import TrainConfig
from unet_jax.train.cpu import XLA_CPU_FLAGS, cpu_device_count, use_cpu_devices, use_xla_cpu_flags
from unet_jax.train.steps import default_steps_per_dispatch

REPO = Path(__file__).resolve().parents[1]


def test_the_device_count_rule():
    assert cpu_device_count(0, (16, 32), cores=2) == 2
    assert cpu_device_count(0, (16, 32), cores=64) == 2  # more than two was never measured
    assert cpu_device_count(0, (16, 32), cores=1) == 1
    assert cpu_device_count(0, (16, 9), cores=2) == 1  # an odd batch cannot be split in two
    assert cpu_device_count(0, (16, 32), distributed=True, cores=2) == 1  # processes divide the cores
    assert cpu_device_count(3, (16, 32), cores=1) == 3  # an explicit count is taken as given
    with pytest.raises(ValueError, match=r"config cpu_devices = -1: expected 0 \(auto\) or a positive integer"):
        TrainConfig(cpu_devices=-1)


def test_the_count_cannot_change_once_jax_runs(monkeypatch):
    jax.devices()  # this process's backend is up
    assert use_cpu_devices(2) is False
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    assert use_cpu_devices(2) is False  # the user's own flag wins


def _fresh_cpu_process(script: str) -> subprocess.CompletedProcess:
    """``script`` in a new Python on the CPU backend, started without XLA_FLAGS as a user's
    process is; asserts that it succeeded."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_a_fresh_process_gets_two_cpu_devices():
    script = "import jax; from unet_jax.train.cpu import use_cpu_devices; print(use_cpu_devices(2), len(jax.devices()))"
    proc = _fresh_cpu_process(script)
    assert proc.stdout.split() == ["True", "2"]


def test_an_epoch_is_one_dispatch_on_every_backend():
    assert default_steps_per_dispatch(27) == 27


def test_xla_cpu_flags_are_added_unless_the_user_named_them(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2")
    added = use_xla_cpu_flags(("--xla_cpu_enable_fast_math=true", "--xla_cpu_use_onednn=true"))
    assert added == ["--xla_cpu_use_onednn=true"]  # the user's fast-math setting stays
    assert os.environ["XLA_FLAGS"] == (
        "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2 --xla_cpu_use_onednn=true"
    )
    monkeypatch.delenv("XLA_FLAGS")
    assert use_xla_cpu_flags(("--xla_cpu_use_onednn=true",)) == ["--xla_cpu_use_onednn=true"]
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_onednn=true"
    assert use_xla_cpu_flags(()) == [] and os.environ["XLA_FLAGS"] == "--xla_cpu_use_onednn=true"


def test_training_takes_ynn_fusion_and_inference_does_not():
    ynn = "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce"
    assert XLA_CPU_FLAGS["train"] == XLA_CPU_FLAGS["demo"] == (ynn,)
    assert XLA_CPU_FLAGS["predict"] == XLA_CPU_FLAGS["evaluate"] == ()


def test_this_jaxlib_accepts_the_training_flags_in_a_fresh_process():
    # XLA aborts on a flag it does not know: a jaxlib that drops one fails here, not in
    # a user's `unet-jax train`. The process starts without XLA_FLAGS, as a user's does.
    script = (
        "import os\n"
        "from unet_jax.cli import _xla_cpu_flags\n"
        "_xla_cpu_flags('predict'); print(os.environ.get('XLA_FLAGS', '-'))\n"
        "_xla_cpu_flags('train'); print(os.environ['XLA_FLAGS'])\n"
        "import jax, jax.numpy as jnp\n"
        "x = jnp.ones((8, 8), jnp.float32)\n"
        "print(float(jax.jit(lambda x: jnp.tanh(x @ x).sum())(x)))\n"
    )
    proc = _fresh_cpu_process(script)
    predict_flags, train_flags, value = proc.stdout.split()
    assert predict_flags == "-" and train_flags == " ".join(XLA_CPU_FLAGS["train"])
    assert abs(float(value) - 64 * math.tanh(8.0)) < 1e-4
