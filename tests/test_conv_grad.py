"""The convolution's gradients written out as canonical convolutions (unet_jax.layers.conv_grad):
equal to JAX's autodiff, and what makes the scanned training step fast on XLA:CPU."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from unet_jax.layers import Conv2D, ConvTranspose2D
from unet_jax.layers.conv_grad import conv_explicit_grad, use_explicit_grad
from unet_jax.models import create_unet

HIGHEST = jax.lax.Precision.HIGHEST


def _dilated(n: int, d: int) -> int:
    return 1 + d * (n - 1)


@given(
    n=st.integers(1, 8),
    k=st.integers(1, 4),
    s=st.integers(1, 3),
    d=st.integers(1, 2),
    lo=st.integers(0, 3),
    hi=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_explicit_gradients_equal_autodiff(n, k, s, d, lo, hi, seed):
    """Strides, input dilation (the transposed convolution), asymmetric and over-wide padding."""
    assume(_dilated(n, d) + lo + hi >= k and _dilated(n + 1, d) + lo + hi >= k)
    assume(d == 1 or s == 1)  # a transposed convolution's dilated input has unit strides
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, n, n + 1, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 3, 2)), jnp.float32)
    strides, pads, dilation = (s, s), ((lo, hi), (hi, lo)), (d, d)

    def xla(x, w):
        return jax.lax.conv_general_dilated(
            x, w, strides, pads, lhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST
        )

    y, explicit_vjp = jax.vjp(lambda x, w: conv_explicit_grad(x, w, strides, pads, dilation, HIGHEST), x, w)
    y_xla, xla_vjp = jax.vjp(xla, x, w)
    np.testing.assert_array_equal(y, y_xla)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    for got, want in zip(explicit_vjp(dy), xla_vjp(dy)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_dilated_input_with_strides_is_refused():
    with pytest.raises(ValueError, match=r"input dilation \(2, 2\) needs unit strides, got \(2, 1\)"):
        conv_explicit_grad(jnp.zeros((1, 4, 4, 1)), jnp.zeros((2, 2, 1, 1)), (2, 1), ((0, 0), (0, 0)), (2, 2))


@pytest.mark.parametrize(
    "layer",
    [
        Conv2D(3, 3, strides=2, padding="SAME"),
        ConvTranspose2D(3, 2, strides=2),
        ConvTranspose2D(3, 3, strides=2, padding=1, output_padding=1, method="subpixel"),
    ],
)
def test_layers_give_the_same_values_and_gradients_either_way(layer):
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 4))
    variables = layer.init(jax.random.key(1), x)

    def loss(variables, x, gradient):
        y = layer.clone(gradient=gradient).apply(variables, x)
        return jnp.sum(jnp.sin(y))

    for gradient in ("explicit", "auto"):
        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(variables, x, gradient)
        value_xla, grads_xla = jax.value_and_grad(loss, argnums=(0, 1))(variables, x, "xla")
        assert value == pytest.approx(float(value_xla), rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_gradient_choice_is_checked_and_auto_follows_the_backend():
    assert use_explicit_grad("auto", "NHWC", 1, "Conv2D") == (jax.default_backend() == "cpu")
    assert not use_explicit_grad("auto", "NCHW", 1, "Conv2D")  # written out for NHWC only
    assert not use_explicit_grad("auto", "NHWC", 4, "Conv2D")  # and without groups
    assert not use_explicit_grad("xla", "NHWC", 1, "Conv2D")
    with pytest.raises(ValueError, match=r"Conv2D 'c'.*gradient must be one of .*'fast'"):
        Conv2D(2, gradient="fast", name="c").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="gradient='explicit' needs layout 'NHWC' and feature_group_count 1"):
        Conv2D(4, feature_group_count=2, gradient="explicit").init(jax.random.key(0), jnp.zeros((1, 4, 4, 2)))
    # Forward mode stays available through JAX's own derivative.
    layer = Conv2D(2, gradient="xla")
    variables = layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    jax.jacfwd(lambda x: layer.apply(variables, x))(jnp.ones((1, 4, 4, 1)))


def _conv_dim_labels(hlo: str) -> list[str]:
    return re.findall(r"convolution\(.*?dim_labels=([\w>-]+)", hlo)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's canonical form is what is checked")
def test_every_convolution_of_a_scanned_gradient_step_is_canonical():
    """XLA:CPU canonicalises convolutions only outside loops; gradient steps of a U-Net
    (convolutions, pooling, a transposed convolution) scanned in a while loop must reach it
    with none left in another layout (the 25x slower scanned step of issue 12). With JAX's
    own gradients some are not, so the check can fail."""

    def compiled_labels(gradient: str) -> list[str]:
        model = create_unet("seed", in_channels=1, features=4, depth=1, gradient=gradient)
        x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
        variables = model.init(jax.random.key(1), x)

        def loss(params):
            return jnp.mean(model.apply({**variables, "params": params}, x) ** 2)

        def steps(params):
            body = lambda p, _: (jax.tree.map(lambda a, g: a - 0.1 * g, p, jax.grad(loss)(p)), None)  # noqa: E731
            return jax.lax.scan(body, params, None, length=2)[0]

        return _conv_dim_labels(jax.jit(steps).lower(variables["params"]).compile().as_text())

    labels = compiled_labels("auto")
    assert len(labels) >= 3 * 8 - 1  # forward, input and kernel gradients (no input gradient of the first)
    assert set(labels) == {"b01f_01io->b01f"}
    assert set(compiled_labels("xla")) != {"b01f_01io->b01f"}
