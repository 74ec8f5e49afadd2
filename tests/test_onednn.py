"""The oneDNN bfloat16 convolutions (unet_jax.layers.onednn, issue 32): the forward pass and
both gradients of the convolution and of the transposed convolution against the literal sums
(unet_jax.layers.reference) and ``lax``, the layers and the run setting that use them, and
the errors. They need g++ and Debian's libdnnl-dev, which .ci/run installs: the tests fail,
never skip, without them.

Tolerances: the inputs are rounded to bfloat16 first, so the reference sees the very numbers
oneDNN multiplies; what is left is oneDNN's rounding of its bfloat16 outputs (8 bits of
mantissa: within 2^-7 of the largest value) and float32 accumulation order.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.config import TrainConfig
from unet_jax.inference import load, predict_probabilities, with_cpu_bf16
from unet_jax.layers import Conv2D, ConvTranspose2D, onednn, reference
from unet_jax.layers.layers import resolve_transpose_padding
from unet_jax.models.build import build_model
from unet_jax.train.cpu import cpu_device_count

BF16_REL = 2.0**-7


def _bf16(x):
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def _close(got, want, rel):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=rel * float(np.max(np.abs(want))))


def _data(shape, kernel, seed):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    return _bf16(jax.random.normal(kx, shape)), _bf16(0.3 * jax.random.normal(kw, kernel))


@pytest.mark.parametrize(
    ("stride", "pads"),
    [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1))), (1, ((2, 0), (0, 2))), (2, ((1, 1), (1, 1)))],
)
def test_conv_matches_the_literal_sum_and_its_gradients_match_lax(stride, pads):
    x, w = _data((2, 9, 10, 16), (3, 3, 16, 8), stride)
    conv = jax.jit(lambda x, w: onednn.conv_bf16(x, w, (stride, stride), pads))
    y = conv(x, w)
    assert y.dtype == jnp.bfloat16
    want = np.stack([reference.conv2d(x[b], w, stride, pads) for b in range(2)])
    _close(y, want, BF16_REL)

    g = _bf16(jax.random.normal(jax.random.PRNGKey(9), want.shape))

    def lax_conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(x, w):
        return jnp.sum(onednn.conv_bf16(x, w, (stride, stride), pads).astype(jnp.float32) * g)

    dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w)
    want_dx, want_dw = jax.grad(lambda x, w: jnp.sum(lax_conv(x, w) * g), (0, 1))(x, w)
    assert dx.dtype == jnp.float32 and dw.dtype == jnp.float32
    _close(dx, want_dx, BF16_REL)
    # The kernel gradient is accumulated and returned in float32: float32's accuracy.
    _close(dw, want_dw, 1e-5)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "out_pad"), [(3, 2, "SAME", 0), (2, 2, "VALID", 0), (3, 2, 1, 1)]
)
def test_transposed_conv_matches_the_scatter_sum_and_its_literal_gradients(kernel, stride, padding, out_pad):
    x, w = _data((2, 5, 6, 16), (kernel, kernel, 16, 8), kernel + stride)
    crop = resolve_transpose_padding(padding, (kernel, kernel), (stride, stride))
    assert onednn.transpose_fits(x.shape, (kernel, kernel), (stride, stride), crop, (out_pad, out_pad))

    def f(x, w):
        return onednn.conv_transpose_bf16(x, w, (stride, stride), crop, (out_pad, out_pad))

    y = jax.jit(f)(x, w)
    want = np.stack([reference.conv_transpose2d_scatter(x[b], w, stride, crop, out_pad) for b in range(2)])
    _close(y, want, BF16_REL)

    g = _bf16(jax.random.normal(jax.random.PRNGKey(5), want.shape))
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g), (0, 1)))(x, w)
    literal = [reference.conv_transpose2d_grads(x[b], w, g[b], stride, crop, out_pad) for b in range(2)]
    _close(dx, np.stack([d for d, _ in literal]), BF16_REL)
    _close(dw, sum(k for _, k in literal), 1e-5)


def test_a_crop_past_half_the_kernel_is_refused_not_miscomputed():
    assert not onednn.transpose_fits((1, 4, 4, 2), (3, 3), (2, 2), ((2, 2), (1, 1)), (0, 0))
    with pytest.raises(ValueError, match="needs paddings"):
        onednn.conv_transpose_bf16(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), (2, 2), ((2, 2), (1, 1)))


def test_a_padding_reaching_the_kernel_size_runs_repeatedly_without_crashing():
    # oneDNN 2.6's kernel gradient corrupted the heap for a vertical padding of kh - 1 (this
    # loop crashed the process every time before conv_bf16 padded that part itself).
    x, w = _data((16, 32, 32, 32), (3, 3, 32, 8), 3)
    pads = ((2, 0), (0, 2))
    g = jnp.ones((16, 32, 32, 8), jnp.float32)
    grad = jax.jit(jax.grad(lambda w: jnp.sum(onednn.conv_bf16(x, w, (1, 1), pads).astype(jnp.float32) * g)))
    for _ in range(20):
        jax.block_until_ready(grad(w))


def test_a_shape_oneDNN_cannot_take_is_an_error_not_a_crash():
    x = jnp.zeros((1, 8, 8, 4), jnp.bfloat16)
    w = jnp.zeros((3, 3, 5, 2), jnp.bfloat16)
    out = jax.ShapeDtypeStruct((1, 8, 8, 2), jnp.bfloat16)
    with pytest.raises(Exception, match="input channels"):
        jax.block_until_ready(onednn._call("ConvFwd", out, x, w, (1, 1), ((1, 1), (1, 1))))
    with pytest.raises(ValueError, match="non-negative"):
        onednn.conv_bf16(x, w, (1, 1), ((-1, 0), (0, 0)))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_the_layers_take_onednn_in_the_inputs_dtype_and_layout(layout):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4) if layout == "NHWC" else (2, 4, 8, 8))
    for fast, slow in [
        (Conv2D(6, 3, layout=layout, lowering="onednn"), Conv2D(6, 3, layout=layout)),
        (
            ConvTranspose2D(6, 3, 2, padding="SAME", layout=layout, method="onednn"),
            ConvTranspose2D(6, 3, 2, padding="SAME", layout=layout, method="zero_insertion"),
        ),
    ]:
        variables = slow.init(jax.random.PRNGKey(1), x)
        variables = jax.tree.map(lambda a: jnp.asarray(_bf16(a)), variables)
        got = fast.apply(variables, jnp.asarray(_bf16(x)))
        assert got.dtype == jnp.float32
        _close(got, slow.apply(variables, jnp.asarray(_bf16(x))), BF16_REL)


def test_cpu_bf16_routes_the_unet_through_onednn_and_takes_one_cpu_device():
    assert onednn.available() and onednn.has_amx()  # this machine: issue 32's Xeon
    config = TrainConfig(preset="padded", model={"features": 4, "depth": 2}, channels=1)
    assert build_model(config).lowering == "lax"
    on = build_model(dataclasses.replace(config, cpu_bf16="on"))
    assert (on.lowering, on.up_method, on.dtype) == ("onednn", "onednn", None)
    assert build_model(dataclasses.replace(config, cpu_bf16="auto")).lowering == "onednn"
    # A model without those fields is left alone.
    other = dataclasses.replace(config, preset="resnet18_classifier", model={}, cpu_bf16="on")
    assert "lowering" not in vars(build_model(other))
    assert cpu_device_count(0, (16, 16), onednn=onednn.wanted("auto")) == 1
    assert cpu_device_count(0, (16, 16), cores=2) == 2
    assert cpu_device_count(2, (16, 16), onednn=True) == 2  # an explicit count wins
    with pytest.raises(ValueError, match="cpu_bf16 must be"):
        onednn.wanted("yes")


def test_cpu_bf16_on_where_onednn_cannot_run_says_why(monkeypatch):
    monkeypatch.setattr(onednn, "available", lambda: False)
    config = TrainConfig(preset="padded", model={"features": 4, "depth": 2}, channels=1, cpu_bf16="on")
    with pytest.raises(RuntimeError, match="libdnnl-dev"):
        build_model(config)
    assert build_model(dataclasses.replace(config, cpu_bf16="auto")).lowering == "lax"


def test_the_bundled_model_predicts_within_bfloat16_rounding_of_float32():
    loaded = load()
    assert with_cpu_bf16(loaded, "off") is loaded
    fast = with_cpu_bf16(loaded, "on")
    assert (fast.model.lowering, fast.model.up_method) == ("onednn", "onednn")
    assert fast.variables is loaded.variables and loaded.model.lowering == "lax"
    images = np.random.default_rng(0).integers(0, 256, (2, *loaded.input_size, loaded.config.channels), np.uint8)
    want = predict_probabilities(loaded, images, 2)
    got = predict_probabilities(fast, images, 2)
    # Probabilities, not logits: bfloat16's rounding moves them by a few thousandths.
    assert float(np.max(np.abs(got - want))) < 0.05


def test_a_first_layer_stays_in_float32():
    # The image itself (8-bit pixels) is not rounded to bfloat16: fewer input channels than
    # MIN_CHANNELS keep XLA's float32 convolution, to float32's accuracy.
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 1))
    layer = Conv2D(8, 3, lowering="onednn")
    variables = Conv2D(8, 3).init(jax.random.PRNGKey(1), x)
    assert 1 < onednn.MIN_CHANNELS
    want = Conv2D(8, 3).apply(variables, x)
    np.testing.assert_allclose(np.asarray(layer.apply(variables, x)), np.asarray(want), rtol=1e-6, atol=1e-6)
