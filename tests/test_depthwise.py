"""The depthwise convolution as shifted multiply-adds (unet_jax.layers.depthwise): forward
and both gradients against ``lax``'s grouped convolution and the literal sum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_jax.layers import Conv2D, reference, resolve_padding
from unet_jax.layers.depthwise import (
    depthwise_conv,
    depthwise_forward,
    depthwise_input_grad,
    depthwise_kernel_grad,
    images_per_chunk,
    use_depthwise_taps,
)


def _lax(x, w, strides, pads):
    return jax.lax.conv_general_dilated(
        x, w, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1]
    )


def _arrays(seed, n, h, w, c, k):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, c)), jnp.float32)
    return x, kernel


def test_ones_kernel_sums_each_window_of_its_own_channel():
    # Closed form: a 3x3 ones kernel at stride 1, padding 1, on a constant image is 9 inside,
    # 6 on edges, 4 in corners, times the channel's value; channels never mix.
    x = jnp.ones((1, 4, 5, 2), jnp.float32) * jnp.asarray([[[[1.0, 10.0]]]], jnp.float32)
    y = depthwise_forward(x, jnp.ones((3, 3, 1, 2), jnp.float32), (1, 1), ((1, 1), (1, 1)))
    counts = np.array([[4, 6, 6, 6, 4], [6, 9, 9, 9, 6], [6, 9, 9, 9, 6], [4, 6, 6, 6, 4]], np.float32)
    np.testing.assert_array_equal(np.asarray(y[0, :, :, 0]), counts)
    np.testing.assert_array_equal(np.asarray(y[0, :, :, 1]), 10 * counts)


def test_forward_equals_the_literal_grouped_sum():
    x, w = _arrays(0, 1, 7, 6, 3, 3)
    pads = ((0, 1), (1, 1))  # TensorFlow's 'SAME' at stride 2 is asymmetric like this
    got = np.asarray(depthwise_forward(x, w, (2, 2), pads))[0]
    want = reference.conv2d(np.asarray(x[0], np.float64), np.asarray(w, np.float64), 2, pads, groups=3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    h=st.integers(3, 11),
    w=st.integers(3, 11),
    c=st.integers(1, 5),
    k=st.sampled_from([1, 3, 5]),
    s=st.integers(1, 3),
    same=st.booleans(),
    seed=st.integers(0, 10),
)
def test_forward_and_both_gradients_equal_lax(h, w, c, k, s, same, seed):
    x, kernel = _arrays(seed, 2, h, w, c, k)
    if (h + (k - 1) < k) or (w + (k - 1) < k):
        return
    pads = resolve_padding("SAME" if same else "VALID", (h, w), (k, k), (s, s))
    if min(h + sum(pads[0]), w + sum(pads[1])) < k:
        return
    y = depthwise_forward(x, kernel, (s, s), pads)
    np.testing.assert_allclose(y, _lax(x, kernel, (s, s), pads), rtol=1e-5, atol=1e-5)
    dy = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(y.shape), jnp.float32)
    _, vjp = jax.vjp(lambda a, b: _lax(a, b, (s, s), pads), x, kernel)
    dx_want, dw_want = vjp(dy)
    np.testing.assert_allclose(depthwise_input_grad(dy, kernel, (h, w), (s, s), pads), dx_want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(depthwise_kernel_grad(x, dy, (k, k), (s, s), pads), dw_want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 2, 3, 6])
def test_kernel_gradient_in_image_chunks_equals_lax(chunk):
    # The scan over chunks of images (the L2-sized path) sums to the same gradient as one
    # pass, for every divisor of the batch.
    x, kernel = _arrays(6, 6, 9, 7, 4, 3)
    pads = resolve_padding("SAME", (9, 7), (3, 3), (2, 2))
    y, vjp = jax.vjp(lambda a, b: _lax(a, b, (2, 2), pads), x, kernel)
    dy = jnp.asarray(np.random.default_rng(7).standard_normal(y.shape), jnp.float32)
    got = depthwise_kernel_grad(x, dy, (3, 3), (2, 2), pads, chunk=chunk)
    np.testing.assert_allclose(got, vjp(dy)[1], rtol=1e-4, atol=1e-4)


def test_chunk_size_fits_the_budget_and_divides_the_batch():
    assert images_per_chunk((16, 64, 64, 96)) == 2  # 1.5 MiB per image, 3 MiB budget
    assert images_per_chunk((16, 32, 32, 144)) == 4
    assert images_per_chunk((8, 8, 8, 16)) == 8  # small: one pass
    assert images_per_chunk((6, 128, 128, 64)) == 1  # one image is over the budget: still 1
    assert images_per_chunk((12, 64, 64, 96)) == 2
    assert images_per_chunk((7, 32, 32, 144)) == 1  # 7 is prime and 7 images are over budget
    with pytest.raises(ValueError, match="chunk=4 must be a positive divisor of the batch size 6"):
        depthwise_kernel_grad(jnp.zeros((6, 5, 5, 2)), jnp.zeros((6, 5, 5, 2)), (3, 3), (1, 1), ((1, 1),) * 2, 4)


def test_custom_vjp_gives_autodiff_gradients_of_lax():
    x, kernel = _arrays(3, 2, 9, 8, 4, 5)
    pads = resolve_padding("SAME", (9, 8), (5, 5), (2, 2))

    def loss(f):
        return lambda a, b: jnp.sum(jnp.sin(f(a, b, (2, 2), pads)))

    got = jax.grad(loss(depthwise_conv), argnums=(0, 1))(x, kernel)
    want = jax.grad(loss(_lax), argnums=(0, 1))(x, kernel)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_bfloat16_inputs_accumulate_in_float32_and_return_bfloat16():
    x, kernel = _arrays(4, 2, 8, 8, 6, 3)
    pads = ((1, 1), (1, 1))
    y = depthwise_forward(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), (1, 1), pads)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), _lax(x, kernel, (1, 1), pads), rtol=0.05, atol=0.1)


def test_conv2d_takes_the_taps_for_depthwise_layers_on_the_cpu_only_with_lax_lowering():
    assert use_depthwise_taps("auto", "NHWC", 8, 8, 8, "lax")  # the suite runs on the CPU
    assert use_depthwise_taps("explicit", "NHWC", 8, 8, 8, "lax")
    assert not use_depthwise_taps("xla", "NHWC", 8, 8, 8, "lax")
    assert not use_depthwise_taps("auto", "NHWC", 4, 8, 8, "lax")  # grouped, not depthwise
    assert not use_depthwise_taps("auto", "NHWC", 8, 8, 16, "lax")  # channel multiplier 2
    assert not use_depthwise_taps("auto", "NCHW", 8, 8, 8, "lax")
    assert not use_depthwise_taps("auto", "NHWC", 1, 1, 1, "lax")


@pytest.mark.parametrize("strides", [1, 2])
def test_conv2d_depthwise_equals_its_lax_path_in_value_and_gradient(strides):
    x, _ = _arrays(5, 2, 10, 9, 6, 3)
    layers = {
        g: Conv2D(6, 3, strides=strides, padding="SAME", feature_group_count=6, gradient=g) for g in ("auto", "xla")
    }
    params = layers["auto"].init(jax.random.key(0), x)
    assert params["params"]["kernel"].shape == (3, 3, 1, 6)

    def loss(g):
        return lambda p, a: jnp.sum(layers[g].apply(p, a) ** 2)

    np.testing.assert_allclose(layers["auto"].apply(params, x), layers["xla"].apply(params, x), rtol=1e-5, atol=1e-5)
    got = jax.grad(loss("auto"), argnums=(0, 1))(params, x)
    want = jax.grad(loss("xla"), argnums=(0, 1))(params, x)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)
