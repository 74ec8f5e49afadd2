"""The layer math, as tests.

Read top to bottom: the size formulas, hand-computable cases, the literal sum equations
(unet_jax.layers.reference) against the jax.lax layers, the adjoint relation between
convolution and transposed convolution, and the errors bad arguments get.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from unet_jax.layers import (
    LAYOUTS,
    Conv2D,
    ConvTranspose2D,
    MaxPool2D,
    conv_output_size,
    conv_transpose_output_size,
    pool_output_size,
    reference,
    resolve_padding,
    tiled_max_pool,
)

HIGHEST = jax.lax.Precision.HIGHEST


def apply_with_kernel(layer, x, kernel, bias=None):
    """Run ``layer`` on ``x`` with a given kernel (and bias) instead of random ones."""
    variables = layer.init(jax.random.key(0), x)
    params = dict(variables["params"])
    params["kernel"] = jnp.asarray(kernel, jnp.float32)
    if "bias" in params:
        params["bias"] = jnp.zeros_like(params["bias"]) if bias is None else jnp.asarray(bias, jnp.float32)
    return np.asarray(layer.apply({"params": params}, x))


def nhwc(a):
    """(H, W) or (H, W, C) NumPy array -> (1, H, W, C) float32 jax array."""
    a = np.asarray(a, np.float32)
    return jnp.asarray(a[None, :, :, None] if a.ndim == 2 else a[None])


# --------------------------------------------------------------------------------------
# 1. The size formulas, by hand
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, k, s, p, expected",
    [
        (5, 3, 1, 0, 3),  # (5 + 0 - 3)/1 + 1
        (5, 3, 1, 1, 5),  # 'same' for k = 3
        (7, 3, 2, 0, 3),  # (7 - 3)/2 + 1
        (8, 3, 2, 1, 4),  # floor((8 + 2 - 3)/2) + 1 = floor(3.5) + 1
        (572, 3, 1, 0, 570),  # the first convolution of Ronneberger et al.
        (568, 2, 2, 0, 284),  # their first pooling
    ],
)
def test_conv_output_size_by_hand(n, k, s, p, expected):
    assert conv_output_size(n, k, s, p) == expected


def test_pool_output_size_defaults_stride_to_window():
    assert pool_output_size(8, 2) == 4
    assert pool_output_size(9, 3, 2) == 4  # overlapping windows: floor((9 - 3)/2) + 1


@pytest.mark.parametrize(
    "n, k, s, p, op, expected",
    [
        (2, 3, 1, 0, 0, 4),  # 1*(2-1) + 3
        (28, 2, 2, 0, 0, 56),  # Ronneberger's first up-convolution: doubles
        (4, 3, 2, 1, 1, 8),  # 3x3 stride-2 'same' (p=1, op=1): doubles too
        (3, 4, 2, 1, 0, 6),  # the DCGAN up-sampling block
    ],
)
def test_conv_transpose_output_size_by_hand(n, k, s, p, op, expected):
    assert conv_transpose_output_size(n, k, s, p, op) == expected


# --------------------------------------------------------------------------------------
# 2. Closed-form cases: ones in, ones kernel
# --------------------------------------------------------------------------------------
def test_ones_kernel_valid_counts_the_window():
    y = apply_with_kernel(Conv2D(1, 3, padding="VALID"), jnp.ones((1, 5, 5, 1)), np.ones((3, 3, 1, 1)))
    np.testing.assert_array_equal(y[0, :, :, 0], np.full((3, 3), 9.0))


def test_ones_kernel_same_counts_the_window_inside_the_image():
    # Zero padding: a corner window sees 4 ones, an edge window 6, an inner one 9.
    y = apply_with_kernel(Conv2D(1, 3, padding="SAME"), jnp.ones((1, 4, 4, 1)), np.ones((3, 3, 1, 1)))
    expected = np.array([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], np.float32)
    np.testing.assert_array_equal(y[0, :, :, 0], expected)


def test_ones_kernel_sums_over_input_channels_and_adds_bias():
    # 3 input channels, 3x3 window: 27 products of ones, plus a bias of 0.5.
    y = apply_with_kernel(Conv2D(2, 3, padding="VALID"), jnp.ones((1, 3, 3, 3)), np.ones((3, 3, 3, 2)), bias=[0.5, -1])
    np.testing.assert_array_equal(y[0, 0, 0], [27.5, 26.0])


def test_report_worked_example_kernel_gives_minus_one():
    # The report's worked example: the kernel [[1, 0], [0, -1]] computes top-left minus
    # bottom-right of each 2x2 window; on this window 0*1 + 1*0 + 1*0 + 1*(-1) = -1.
    window = np.array([[0.0, 1.0], [1.0, 1.0]])
    kernel = np.array([[1.0, 0.0], [0.0, -1.0]])
    y = apply_with_kernel(Conv2D(1, 2, padding="VALID"), nhwc(window), kernel[:, :, None, None])
    assert y.shape == (1, 1, 1, 1)
    assert y.item() == -1.0
    assert reference.conv2d(window, kernel).item() == -1.0


def test_strided_convolution_skips_positions():
    x = np.arange(25, dtype=np.float32).reshape(5, 5)
    kernel = np.zeros((1, 1, 1, 1), np.float32) + 1.0  # 1x1 identity kernel
    y = apply_with_kernel(Conv2D(1, 1, strides=2, padding="VALID"), nhwc(x), kernel)
    np.testing.assert_array_equal(y[0, :, :, 0], x[::2, ::2])


def test_maxpool_picks_the_window_maximum():
    x = np.array([[1, 2, 5, 0], [3, 4, 1, 1], [0, 0, 7, 8], [9, 0, 6, 5]], np.float32)
    y = MaxPool2D(2).apply({}, nhwc(x))
    np.testing.assert_array_equal(y[0, :, :, 0], [[4, 5], [9, 8]])


def test_maxpool_padding_never_wins_even_for_negative_inputs():
    x = -np.ones((3, 3), np.float32)
    y = MaxPool2D(2, strides=2, padding=1).apply({}, nhwc(x))
    np.testing.assert_array_equal(y[0, :, :, 0], -np.ones((2, 2)))


def test_maxpool_on_integers_pads_with_the_dtype_minimum():
    # -inf has no int32 representation; the smallest int32 plays its role: padding never
    # wins, even against negative inputs (or an input equal to that minimum itself).
    low = np.iinfo(np.int32).min
    x = jnp.array([[-5, -1, -7], [-3, -2, low], [-9, -8, -6]], jnp.int32)[None, :, :, None]
    y = MaxPool2D(2, strides=2, padding=1).apply({}, x)
    assert y.dtype == jnp.int32
    # Padded with one row/column of iinfo.min on every side: windows of 1, 2 or 4 pixels.
    np.testing.assert_array_equal(y[0, :, :, 0], [[-5, -1], [-3, -2]])
    np.testing.assert_array_equal(MaxPool2D(3).apply({}, x)[0, :, :, 0], [[-1]])


def test_maxpool_gradient_flows_to_each_window_maximum():
    x = jnp.array([[1.0, 2.0, 5.0, 0.0], [3.0, 4.0, 1.0, 1.0]])
    grad = jax.grad(lambda x: MaxPool2D(2).apply({}, x[None, :, :, None]).sum())(x)
    np.testing.assert_array_equal(grad, [[0, 0, 1, 0], [0, 1, 0, 0]])


def test_overlapping_maxpool():
    x = np.arange(16, dtype=np.float32).reshape(4, 4)
    y = MaxPool2D(3, strides=1).apply({}, nhwc(x))  # stride 1 < window 3
    np.testing.assert_array_equal(y[0, :, :, 0], [[10, 11], [14, 15]])


def test_transposed_ones_counts_overlapping_kernel_copies():
    # Stride 1, 2x2 ones kernel on a 2x2 ones input: each output pixel counts how many
    # kernel copies cover it (1 at corners, 2 on edges, 4 in the centre).
    y = apply_with_kernel(ConvTranspose2D(1, 2, strides=1), jnp.ones((1, 2, 2, 1)), np.ones((2, 2, 1, 1)))
    np.testing.assert_array_equal(y[0, :, :, 0], [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


def test_transposed_stride_equal_kernel_tiles_without_overlap():
    # k = s = 2: every input pixel paints its own 2x2 block (the U-Net up-convolution).
    x = np.array([[1, 2], [3, 4]], np.float32)
    y = apply_with_kernel(ConvTranspose2D(1, 2, strides=2), nhwc(x), np.ones((2, 2, 1, 1)))
    np.testing.assert_array_equal(y[0, :, :, 0], np.kron(x, np.ones((2, 2))))


def test_transposed_convolution_is_zero_insertion_then_convolution():
    x = np.array([[1, 2], [3, 4]], np.float64)
    np.testing.assert_array_equal(reference.insert_zeros(x, 2)[:, :, 0], [[1, 0, 2], [0, 0, 0], [3, 0, 4]])


# --------------------------------------------------------------------------------------
# 3. Properties over random sizes: shapes equal the formulas, values equal the sums
# --------------------------------------------------------------------------------------
pad_amount = st.one_of(st.integers(0, 2), st.tuples(st.integers(0, 2), st.integers(0, 2)))


def explicit(p):
    return (p, p) if isinstance(p, int) else p


@given(
    n=st.integers(1, 10),
    m=st.integers(1, 10),
    k=st.integers(1, 4),
    s=st.integers(1, 3),
    p=pad_amount,
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_conv2d_matches_formula_and_literal_sum(n, m, k, s, p, c_in, c_out, seed):
    pads = (explicit(p), explicit(p))
    layer = Conv2D(c_out, k, strides=s, padding=pads, precision=HIGHEST)
    x = jax.random.normal(jax.random.key(seed), (1, n, m, c_in))
    if n + sum(explicit(p)) < k or m + sum(explicit(p)) < k:
        with pytest.raises(ValueError, match="kernel size"):
            layer.init(jax.random.key(0), x)
        return
    rng = np.random.default_rng(seed)
    kernel, bias = rng.normal(size=(k, k, c_in, c_out)), rng.normal(size=c_out)
    y = apply_with_kernel(layer, x, kernel, bias)
    assert y.shape == (1, conv_output_size(n, k, s, explicit(p)), conv_output_size(m, k, s, explicit(p)), c_out)
    expected = reference.conv2d(np.asarray(x[0]), kernel, s, pads, bias)
    np.testing.assert_allclose(y[0], expected.reshape(y.shape[1:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "n, k, s, p, groups, per_in, per_out, seed",
    [
        (6, 3, 2, 1, 3, 1, 1, 0),  # depthwise, stride 2, explicit padding 1 (TinyViT's PatchMerging)
        (5, 3, 1, 1, 2, 1, 1, 1),  # depthwise 3x3 (MBConv, local_conv)
        (5, 2, 1, 0, 2, 2, 3, 2),  # grouped, 2 in / 3 out channels per group
        (4, 1, 1, 0, 1, 2, 2, 3),  # G = 1: the ordinary convolution
    ],
)
def test_grouped_and_depthwise_conv2d_match_literal_sum(n, k, s, p, groups, per_in, per_out, seed):
    # feature_group_count = G: kernel (k, k, C_in / G, C_out); per_in = per_out = 1 is the
    # depthwise convolution (LiteMedSAM's TinyViT), against the literal grouped sum.
    c_in, c_out = groups * per_in, groups * per_out
    pads = ((p, p), (p, p))
    layer = Conv2D(c_out, k, strides=s, padding=pads, feature_group_count=groups, precision=HIGHEST)
    x = jax.random.normal(jax.random.key(seed), (1, n, n + 1, c_in))
    rng = np.random.default_rng(seed)
    kernel, bias = rng.normal(size=(k, k, per_in, c_out)), rng.normal(size=c_out)
    y = apply_with_kernel(layer, x, kernel, bias)
    expected = reference.conv2d(np.asarray(x[0]), kernel, s, pads, bias, groups=groups)
    assert y.shape == (1, *expected.reshape(expected.shape[0], expected.shape[1], -1).shape)
    np.testing.assert_allclose(y[0], expected.reshape(y.shape[1:]), rtol=1e-5, atol=1e-5)
    # Depthwise by hand: one filter per channel.
    if per_in == per_out == 1:
        xp = np.pad(np.asarray(x[0], np.float64), ((p, p), (p, p), (0, 0)))
        for c in range(c_in):
            lit = reference.conv2d(xp[:, :, c], kernel[:, :, 0, c], s) + bias[c]
            np.testing.assert_allclose(y[0, :, :, c], lit, rtol=1e-5, atol=1e-5)


def test_grouped_conv2d_refuses_groups_that_do_not_divide():
    with pytest.raises(ValueError, match=r"feature_group_count 2 must divide the input channels \(3"):
        Conv2D(4, 3, feature_group_count=2).init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"groups 2 must divide"):
        reference.conv2d(np.ones((4, 4, 3)), np.ones((3, 3, 1, 2)), groups=2)


@given(
    n=st.integers(1, 10),
    m=st.integers(1, 10),
    k=st.integers(1, 4),
    s=st.integers(1, 3),
    p=st.integers(0, 1),
    c=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_maxpool_matches_formula_and_literal_max(n, m, k, s, p, c, seed):
    assume(n + 2 * p >= k and m + 2 * p >= k)
    x = jax.random.normal(jax.random.key(seed), (1, n, m, c))
    y = np.asarray(MaxPool2D(k, strides=s, padding=p).apply({}, x))
    assert y.shape == (1, pool_output_size(n, k, s, p), pool_output_size(m, k, s, p), c)
    np.testing.assert_array_equal(y[0], reference.maxpool2d(np.asarray(x[0]), k, s, ((p, p), (p, p))))


@given(
    n=st.integers(1, 6),
    m=st.integers(1, 6),
    k=st.integers(1, 4),
    s=st.integers(1, 3),
    p=st.integers(0, 2),
    op=st.integers(0, 2),
    c_in=st.integers(1, 3),
    c_out=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_conv_transpose2d_matches_formula_and_both_definitions(n, m, k, s, p, op, c_in, c_out, seed):
    assume(op < s and p <= k - 1)
    assume(s * (min(n, m) - 1) + k - 2 * p + op >= 1)
    layer = ConvTranspose2D(c_out, k, strides=s, padding=p, output_padding=op, precision=HIGHEST)
    x = jax.random.normal(jax.random.key(seed), (1, n, m, c_in))
    rng = np.random.default_rng(seed)
    kernel, bias = rng.normal(size=(k, k, c_in, c_out)), rng.normal(size=c_out)
    y = apply_with_kernel(layer, x, kernel, bias)
    assert y.shape == (1, conv_transpose_output_size(n, k, s, p, op), conv_transpose_output_size(m, k, s, p, op), c_out)
    pads = ((p, p), (p, p))
    by_zero_insertion = reference.conv_transpose2d(np.asarray(x[0]), kernel, s, pads, op, bias)
    by_scatter = reference.conv_transpose2d_scatter(np.asarray(x[0]), kernel, s, pads, op) + bias
    np.testing.assert_allclose(by_zero_insertion, by_scatter, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y[0], by_scatter, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------
# 4. Transposed convolution is the adjoint of convolution
# --------------------------------------------------------------------------------------
@given(
    n=st.integers(3, 7),
    k=st.integers(1, 3),
    s=st.integers(1, 3),
    p=st.integers(0, 1),
    c_in=st.integers(1, 2),
    c_out=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_transposed_convolution_jacobian_is_the_transpose_of_convolutions(n, k, s, p, c_in, c_out, seed):
    assume(p <= k - 1 and n + 2 * p >= k)
    m = conv_output_size(n, k, s, p)
    op = (n + 2 * p - k) % s  # rows the strided convolution ignored: they come back here
    assert conv_transpose_output_size(m, k, s, p, op) == n
    kernel = np.random.default_rng(seed).normal(size=(k, k, c_in, c_out))

    conv = Conv2D(c_out, k, strides=s, padding=p, use_bias=False, precision=HIGHEST)
    # Same kernel, in/out axes swapped: it maps the c_out channels back to c_in.
    convt = ConvTranspose2D(c_in, k, strides=s, padding=p, output_padding=op, use_bias=False, precision=HIGHEST)
    forward = lambda x: apply_with_kernel_jax(conv, x, kernel)  # noqa: E731
    backward = lambda y: apply_with_kernel_jax(convt, y, kernel.transpose(0, 1, 3, 2))  # noqa: E731

    jac_conv = jax.jacrev(forward)(jnp.zeros((1, n, n, c_in))).reshape(m * m * c_out, n * n * c_in)
    jac_convt = jax.jacrev(backward)(jnp.zeros((1, m, m, c_out))).reshape(n * n * c_in, m * m * c_out)
    np.testing.assert_allclose(jac_convt, jac_conv.T, rtol=1e-6, atol=1e-6)


def apply_with_kernel_jax(layer, x, kernel):
    return layer.apply({"params": {"kernel": jnp.asarray(kernel, jnp.float32)}}, x)


# --------------------------------------------------------------------------------------
# 5. 'SAME' conventions match TensorFlow/Keras and jax.lax
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k, s", [(8, 3, 2), (7, 3, 2), (6, 2, 2), (5, 4, 3), (9, 3, 1)])
def test_same_convolution_matches_lax_same(n, k, s):
    x = jax.random.normal(jax.random.key(1), (2, n, n + 1, 3))
    kernel = np.random.default_rng(0).normal(size=(k, k, 3, 4))
    y = apply_with_kernel(Conv2D(4, k, strides=s, padding="SAME", precision=HIGHEST), x, kernel)
    expected = jax.lax.conv_general_dilated(
        x,
        jnp.asarray(kernel, jnp.float32),
        (s, s),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST,
    )
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n, k, s", [(4, 3, 2), (5, 2, 2), (3, 4, 2), (4, 3, 1), (3, 5, 3)])
def test_same_transposed_convolution_matches_keras_placement(n, k, s):
    # jax.lax.conv_transpose(..., transpose_kernel=True) is documented to equal
    # keras.layers.Conv2DTranspose(padding='same') for a Keras (kh, kw, out, in) kernel.
    x = jax.random.normal(jax.random.key(2), (2, n, n, 3))
    kernel = np.random.default_rng(1).normal(size=(k, k, 3, 5))  # ours: (kh, kw, in, out)
    y = apply_with_kernel(ConvTranspose2D(5, k, strides=s, padding="SAME", precision=HIGHEST), x, kernel)
    keras_kernel = jnp.asarray(kernel.transpose(0, 1, 3, 2), jnp.float32)
    expected = jax.lax.conv_transpose(
        x,
        keras_kernel,
        (s, s),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        transpose_kernel=True,
        precision=HIGHEST,
    )
    assert y.shape == (2, s * n, s * n, 5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_same_padding_puts_the_odd_row_at_the_bottom():
    assert resolve_padding("SAME", (8, 7), (3, 4), (2, 1)) == ((0, 1), (1, 2))


# --------------------------------------------------------------------------------------
# 6. Mixed precision and parameter layout
# --------------------------------------------------------------------------------------
def test_bf16_compute_keeps_float32_parameters():
    layer = Conv2D(4, 3, dtype=jnp.bfloat16)
    x = jnp.ones((1, 6, 6, 2))
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert variables["params"]["kernel"].shape == (3, 3, 2, 4)
    assert layer.apply(variables, x).dtype == jnp.bfloat16


def test_he_normal_init_scale():
    # Keras he_normal: truncated normal with std sqrt(2 / fan_in); the truncation at two
    # standard deviations is rescaled so the sample std matches.
    kernel = Conv2D(256, 3).init(jax.random.key(0), jnp.ones((1, 3, 3, 64)))["params"]["kernel"]
    assert abs(float(jnp.std(kernel)) / np.sqrt(2 / (3 * 3 * 64)) - 1) < 0.02
    assert float(jnp.abs(kernel).max()) <= 2 * np.sqrt(2 / (3 * 3 * 64)) * 1.14


# --------------------------------------------------------------------------------------
# 7. Errors name the argument, the value received and what was expected
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [Conv2D(2, 3), MaxPool2D(2), ConvTranspose2D(2, 2)])
def test_wrong_rank_is_refused(layer):
    # On its own a layer has no name: the message starts "Conv2D: ", never "Conv2D None: ".
    kind = type(layer).__name__
    with pytest.raises(ValueError, match=rf"^{kind}: input must be rank 4 .*got rank 3 with shape \(8, 8, 1\)"):
        layer.init(jax.random.key(0), jnp.ones((8, 8, 1)))


def test_errors_name_the_layer_when_it_has_a_name():
    with pytest.raises(ValueError, match=r"^Conv2D 'enc1': input must be rank 4"):
        Conv2D(2, 3, name="enc1").init(jax.random.key(0), jnp.ones((8, 8, 1)))


@pytest.mark.parametrize("cls", [Conv2D, ConvTranspose2D])
def test_wrong_channel_count_is_refused(cls):
    with pytest.raises(ValueError, match=r"has 3 channels .*expected 1"):
        cls(2, 2, in_features=1).init(jax.random.key(0), jnp.ones((1, 8, 8, 3)))


def test_kernel_larger_than_padded_input_is_refused():
    with pytest.raises(ValueError, match=r"kernel size 5 is larger than the padded input 4"):
        Conv2D(1, 5, padding=1).init(jax.random.key(0), jnp.ones((1, 2, 2, 1)))
    with pytest.raises(ValueError, match=r"kernel size 3 is larger than the padded input 2"):
        MaxPool2D(3).init(jax.random.key(0), jnp.ones((1, 2, 2, 1)))


@pytest.mark.parametrize("stride", [0, -1])
def test_non_positive_stride_is_refused(stride):
    for layer in (Conv2D(1, 3, strides=stride), MaxPool2D(2, strides=stride), ConvTranspose2D(1, 2, strides=stride)):
        with pytest.raises(ValueError, match=rf"strides must be positive, got {stride}"):
            layer.init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))


def test_bad_padding_and_output_padding_are_refused():
    with pytest.raises(ValueError, match="padding must be 'SAME', 'VALID'"):
        Conv2D(1, 3, padding="FULL").init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="padding must be >= 0, got -1"):
        Conv2D(1, 3, padding=-1).init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"output_padding must satisfy 0 <= output_padding < stride \(2\), got 2"):
        ConvTranspose2D(1, 3, strides=2, output_padding=2).init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))


def test_reference_convolution_refuses_a_channel_mismatch():
    # A ValueError (an assert would vanish under python -O) naming both channel counts.
    with pytest.raises(ValueError, match=r"input has 2 channels .*expects C_in = 3"):
        reference.conv2d(np.ones((4, 4, 2)), np.ones((3, 3, 3, 1)))


def test_size_formulas_refuse_impossible_arguments():
    with pytest.raises(ValueError, match="stride must be a positive integer, got 0"):
        conv_output_size(5, 3, 0)
    with pytest.raises(ValueError, match="kernel size must be a positive integer, got 0"):
        conv_transpose_output_size(5, 0)
    with pytest.raises(ValueError, match="removes the whole output"):
        conv_transpose_output_size(1, 2, 1, 1)


# --------------------------------------------------------------------------------------
# Tiled max pooling: the reduce_window values and gradient, ties included
# --------------------------------------------------------------------------------------
@given(
    h=st.integers(2, 9),
    w=st.integers(2, 9),
    k=st.integers(1, 3),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_tiled_max_pool_equals_reduce_window_with_ties(h, w, k, layout, seed):
    """Integer-valued inputs make ties common: the gradient must go to the first maximum of
    each window, as reduce_window's select_and_scatter does; rows past the last whole
    window get none."""
    assume(h >= k and w >= k)
    rng = np.random.default_rng(seed)
    shape = (2, h, w, 3) if layout == "NHWC" else (2, 3, h, w)
    x = jnp.asarray(rng.integers(0, 3, shape), jnp.float32)
    dims = (1, k, k, 1) if layout == "NHWC" else (1, 1, k, k)

    def reference(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, dims, "VALID")

    y, tiled_vjp = jax.vjp(lambda x: tiled_max_pool(x, (k, k), layout), x)
    y_ref, reference_vjp = jax.vjp(reference, x)
    np.testing.assert_array_equal(y, y_ref)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    np.testing.assert_array_equal(tiled_vjp(dy)[0], reference_vjp(dy)[0])
    assert MaxPool2D(k, layout=layout).apply({}, x).shape == y.shape
