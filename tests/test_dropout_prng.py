"""The dropout key's bit generator (TrainConfig.dropout_prng, unet_jax.train.steps.run_keys):
XLA's RngBitGenerator (``rbg``, ``unsafe_rbg``) instead of threefry2x32, with results that do
not depend on how many CPU devices the batch is split over."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.config import TrainConfig
from unet_jax.layers.dropout import Dropout8, keep_mask_8bit
from unet_jax.train.steps import run_keys

REPO = Path(__file__).resolve().parents[1]


def test_run_keys_keep_the_data_key_and_change_only_the_dropout_key():
    data, dropout = run_keys(7)
    assert jax.random.key_impl(dropout) == jax.random.key_impl(data)
    for impl in ("rbg", "unsafe_rbg"):
        data_rbg, dropout_rbg = run_keys(7, impl)
        assert (jax.random.key_data(data_rbg) == jax.random.key_data(data)).all()  # same data order
        assert str(jax.random.key_impl(dropout_rbg)) == impl
    with pytest.raises(ValueError, match="dropout_prng"):
        TrainConfig(dropout_prng="philox")


def test_one_step_is_the_same_on_one_and_two_devices_for_every_dropout_prng():
    # One seed-preset step (dropout 0.2) on a mesh of one CPU device and of two; the
    # parameters agree up to summation order for each generator, and the generators differ
    # from each other (so dropout is in effect and the key's implementation is used).
    script = textwrap.dedent(
        """
        import dataclasses, jax, jax.numpy as jnp, numpy as np, optax, sys
        assert jax.device_count() == 2, jax.devices()
        sys.path.insert(0, 'tests')
        from test_train import SHALLOW, tiny_state, random_device_data
        from unet_jax.data import AugmentConfig, make_sampler
        from unet_jax.losses import get_loss
        from unet_jax.train.steps import make_mesh, run_keys, train_steps
        from jax.sharding import NamedSharding, PartitionSpec

        data, sample = random_device_data(), make_sampler(8, 16, AugmentConfig())
        params = {}
        bits8 = dataclasses.replace(SHALLOW, model={**SHALLOW.model, "dropout_bits": 8})
        for impl in ("threefry2x32", "rbg", "unsafe_rbg", "threefry2x32+8", "unsafe_rbg+8"):
            config = bits8 if impl.endswith("+8") else SHALLOW
            data_key, dropout_key = run_keys(3, impl.removesuffix("+8"))
            for devices in (jax.devices()[:1], jax.devices()):
                mesh = make_mesh(devices)
                replicated = NamedSharding(mesh, PartitionSpec())
                state = jax.device_put(tiny_state(config, tx=optax.sgd(0.05), size=16), replicated)
                state, _ = train_steps(state, jax.device_put(data, replicated), data_key, dropout_key,
                                       jnp.int32(0), num_steps=1, sample=sample, loss_fn=get_loss("bce_dice"),
                                       threshold=0.5, mesh=mesh)
                params[impl, len(devices)] = jax.tree.leaves(jax.device_get(state.params))
        def gap(a, b):
            return max(float(np.max(np.abs(u - v))) for u, v in zip(params[a], params[b]))
        for impl in ("threefry2x32", "rbg", "unsafe_rbg", "threefry2x32+8", "unsafe_rbg+8"):
            print(impl, "devices", gap((impl, 1), (impl, 2)))
        print("rbg-threefry", gap(("rbg", 1), ("threefry2x32", 1)))
        print("unsafe_rbg-rbg", gap(("unsafe_rbg", 1), ("rbg", 1)))
        print("8bit-32bit", gap(("threefry2x32+8", 1), ("threefry2x32", 1)))
        """
    )
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    gaps = {" ".join(line.split()[:-1]): float(line.split()[-1]) for line in proc.stdout.splitlines()}
    for impl in ("threefry2x32", "rbg", "unsafe_rbg", "threefry2x32+8", "unsafe_rbg+8"):
        assert gaps[f"{impl} devices"] <= 1e-6, gaps
    assert gaps["rbg-threefry"] > 1e-4 and gaps["unsafe_rbg-rbg"] > 1e-4, gaps
    assert gaps["8bit-32bit"] > 1e-4, gaps  # 8-bit draws are in effect


def test_8bit_dropout_keeps_the_rounded_rate_and_the_expectation():
    """One 32-bit draw per four elements: the keep rate is 1 - round(256 rate) / 256, every
    byte value is used, and the kept elements' scale keeps the mean."""
    x = jnp.ones((64, 32, 32, 4))
    layer = Dropout8(0.2)
    y = layer.apply({}, x, rngs={"dropout": jax.random.key(0)})
    keep, keep_prob = keep_mask_8bit(jax.random.key(0), x.shape, 0.2)
    assert keep_prob == 1 - 51 / 256
    assert abs(float(jnp.mean(y != 0)) - keep_prob) < 3e-3  # the layer's own key, the same rate
    assert abs(float(keep.mean()) - keep_prob) < 3e-3  # 262,144 draws: ~1e-3 standard error
    assert abs(float(y.mean()) - 1.0) < 5e-3
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 256 / 205], rtol=1e-6)
    assert Dropout8(0.2, deterministic=True).apply({}, x) is x
    # Four masks' worth per word: the 32-bit stream is a quarter as long.
    jaxpr = str(jax.make_jaxpr(lambda k: keep_mask_8bit(k, (1000,), 0.5)[0])(jax.random.key(1)))
    assert "shape=(250,)" in jaxpr
