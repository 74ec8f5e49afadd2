"""The transposed convolution's methods (ConvTranspose2D.method, UNet.up_method; issue 31):
every one against the ``lax`` reference and the literal sums (unet_jax.layers.reference), on
value and gradient, in both layouts and with both gradient choices; 'auto' per backend; and
the property the GPU needs: no kernel gradient keeps the lhs dilation."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.layers import ConvTranspose2D, reference, resolve_transpose_padding
from unet_jax.layers.layers import AUTO_TRANSPOSE_METHOD, TRANSPOSE_METHODS, resolve_transpose_method
from unet_jax.models import create_unet

HIGHEST = jax.lax.Precision.HIGHEST
# "onednn" computes in bfloat16 and takes fewer geometries: tests/test_onednn.py checks it.
METHODS = [m for m in TRANSPOSE_METHODS if m not in ("auto", "onednn")]
# (kernel, stride, padding, output_padding): the U-Nets' up-convolutions, PyTorch's, and
# crops and output padding of every kind.
GEOMETRIES = [
    (2, 2, "SAME", 0),  # padded preset
    (3, 2, "SAME", 0),  # seed preset (Keras placement)
    (3, 2, 1, 1),  # PyTorch's k=3, s=2, p=1, output_padding=1
    (2, 2, ((1, 0), (0, 1)), 1),  # k = s with crops and output padding
    (4, 2, ((2, 0), (1, 1)), 0),  # asymmetric crops, overlapping windows
    (3, 3, "VALID", 2),
]


def _cases():
    for method in METHODS:
        for k, s, padding, op in GEOMETRIES:
            if method != "matmul" or k == s:
                yield pytest.param(method, k, s, padding, op, id=f"{method}-k{k}s{s}-{padding}-op{op}")


def _lax_reference(x, w, s, crop, op):
    """``lax.conv_transpose`` (kernel flipped by hand) on the zero-inserted input's padding."""
    pads = [(k - 1 - lo, k - 1 - hi + op) for k, (lo, hi) in zip(w.shape[:2], crop)]
    return jax.lax.conv_transpose(
        x, jnp.flip(w, (0, 1)), (s, s), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST
    )


@pytest.mark.parametrize("method, k, s, padding, op", list(_cases()))
def test_every_method_matches_lax_and_the_literal_sums_in_value_and_gradient(method, k, s, padding, op):
    x = jax.random.normal(jax.random.key(0), (2, 4, 5, 2))
    w = jax.random.normal(jax.random.key(1), (k, k, 2, 3))
    crop = resolve_transpose_padding(padding, (k, k), (s, s))
    lax_y, lax_vjp = jax.vjp(lambda x, w: _lax_reference(x, w, s, crop, op), x, w)
    probe = jax.random.normal(jax.random.key(2), lax_y.shape)
    lax_dx, lax_dw = lax_vjp(probe)
    literal_y = reference.conv_transpose2d_scatter(np.asarray(x[1]), np.asarray(w), s, crop, op)
    literal_dx, literal_dw = reference.conv_transpose2d_grads(
        np.asarray(x[1]), np.asarray(w), np.asarray(probe[1]), s, crop, op
    )
    np.testing.assert_allclose(lax_y[1], literal_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lax_dx[1], literal_dx, rtol=1e-5, atol=1e-5)

    for layout, gradient in (("NHWC", "xla"), ("NHWC", "explicit"), ("NCHW", "xla")):
        layer = ConvTranspose2D(
            3, k, strides=s, padding=padding, output_padding=op, use_bias=False, method=method,
            layout=layout, gradient=gradient, precision=HIGHEST,
        )  # fmt: skip
        to, back = ((0, 3, 1, 2), (0, 2, 3, 1)) if layout == "NCHW" else ((0, 1, 2, 3),) * 2

        def apply(x, w, layer=layer, to=to, back=back):
            return jnp.transpose(layer.apply({"params": {"kernel": w}}, jnp.transpose(x, to)), back)

        y, vjp = jax.vjp(apply, x, w)
        dx, dw = vjp(probe)
        where = f"{method} {layout} gradient={gradient}"
        np.testing.assert_allclose(y, lax_y, rtol=1e-5, atol=1e-5, err_msg=where)
        np.testing.assert_allclose(dx, lax_dx, rtol=1e-5, atol=1e-5, err_msg=where)
        np.testing.assert_allclose(dw, lax_dw, rtol=1e-5, atol=1e-4, err_msg=where)
        np.testing.assert_allclose(y[1], literal_y, rtol=1e-5, atol=1e-5, err_msg=where)
        np.testing.assert_allclose(dx[1], literal_dx, rtol=1e-5, atol=1e-5, err_msg=where)
    # The kernel gradient sums over the batch: the literal one of each image, added.
    literal_dw += reference.conv_transpose2d_grads(np.asarray(x[0]), np.asarray(w), np.asarray(probe[0]), s, crop, op)[
        1
    ]
    np.testing.assert_allclose(dw, literal_dw, rtol=1e-5, atol=1e-4)


def test_auto_takes_the_backends_entry_and_matmul_needs_kernel_equal_to_stride():
    table = AUTO_TRANSPOSE_METHOD["cpu" if jax.default_backend() == "cpu" else "gpu"]
    assert resolve_transpose_method("auto", (2, 2), (2, 2)) == table["k=s"]
    assert resolve_transpose_method("auto", (3, 3), (2, 2)) == table["k>s"]
    assert all(m in TRANSPOSE_METHODS and m != "auto" for t in AUTO_TRANSPOSE_METHOD.values() for m in t.values())
    assert table["k>s"] != "matmul"
    assert resolve_transpose_method("interleave", (3, 3), (2, 2)) == "interleave"
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match=r"ConvTranspose2D 'up': method 'matmul' needs kernel_size == strides"):
        ConvTranspose2D(2, 3, strides=2, method="matmul", name="up").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"method must be one of .*'onednn'\), got 'fft'"):
        ConvTranspose2D(2, method="fft").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="model.up_method = 'matmul' with up_kernel 3"):
        create_unet("seed", up_method="matmul")


def _lhs_dilations(hlo: str) -> list[str]:
    return re.findall(r"lhs_dilate = \[([\d, ]+)\]", hlo)


@pytest.mark.parametrize("method", METHODS)
def test_no_kernel_gradient_keeps_the_lhs_dilation_but_zero_insertions(method):
    """The cause issue 31 names: autodiff of an lhs-dilated convolution gives a kernel
    gradient that keeps the dilation (cuDNN's backward-filter call cannot take it). Every
    other method's kernel gradient is free of it; zero insertion's is not, so this can fail."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    layer = ConvTranspose2D(4, 2, strides=2, padding="SAME", method=method, gradient="xla")
    variables = layer.init(jax.random.key(1), x)
    probe = jax.random.normal(jax.random.key(2), (2, 10, 12, 4))
    # A linear loss: the gradient needs no forward pass, so every convolution left is a
    # gradient's (the forward may keep its dilation: cuDNN runs that as backward-data).
    grad = jax.jit(jax.grad(lambda v: jnp.sum(layer.apply(v, x) * probe)))
    dilations = _lhs_dilations(grad.lower(variables).as_text())
    if method == "zero_insertion":
        assert "2, 2" in dilations
    else:
        assert all(d == "1, 1" for d in dilations), dilations


@pytest.mark.parametrize("preset", ["seed", "padded"])
def test_unet_up_methods_keep_parameters_outputs_and_gradients(preset):
    model = create_unet(preset, features=4, depth=2, dropout_rate=0.0, up_method="zero_insertion")
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, model.in_channels))
    variables = model.init(jax.random.key(1), x)

    def loss(params, model):
        y, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.sin(y))

    value, grads = jax.value_and_grad(loss)(variables["params"], model)
    for method in ("auto", *METHODS):
        if method == "matmul" and model.up_kernel != 2:
            continue
        other = model.clone(up_method=method)
        assert jax.tree.structure(other.init(jax.random.key(1), x)) == jax.tree.structure(variables)
        v, g = jax.value_and_grad(loss)(variables["params"], other)
        assert float(v) == pytest.approx(float(value), rel=1e-5, abs=1e-6), method
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=method)
