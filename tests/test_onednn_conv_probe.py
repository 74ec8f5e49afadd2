"""Issue 32's oneDNN probe (benchmarks/onednn_conv_probe.{py,cc}) computes the convolution
that ``lax`` computes, on stride 1 and 2 and asymmetric padding, and a wrong shape is an
error, not a crash. It needs g++ and Debian's libdnnl-dev, which .ci/run installs: the test
fails, never skips, without them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import onednn_conv_probe


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    return onednn_conv_probe.register(onednn_conv_probe.build(tmp_path_factory.mktemp("onednn")))


@pytest.mark.parametrize(("stride", "padding"), [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1))), (1, ((2, 0), (0, 2)))])
def test_the_probe_matches_lax_on_bfloat16_inputs(conv, stride, padding):
    kx, kw = jax.random.split(jax.random.PRNGKey(stride))
    x = jax.random.normal(kx, (2, 9, 10, 16)).astype(jnp.bfloat16)
    w = (0.2 * jax.random.normal(kw, (3, 3, 16, 8))).astype(jnp.bfloat16)
    got = jax.jit(conv, static_argnums=(2, 3))(x, w, stride, padding)
    want = jax.lax.conv_general_dilated(
        x.astype(jnp.float32),
        w.astype(jnp.float32),
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    assert got.shape == want.shape and got.dtype == jnp.bfloat16
    # bfloat16 output: 8 bits of mantissa, so within 2^-7 of the largest value.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=float(jnp.max(jnp.abs(want))) / 128)


def test_a_kernel_whose_channels_disagree_is_an_error_not_a_crash(conv):
    x = jnp.zeros((1, 8, 8, 4), jnp.bfloat16)
    w = jnp.zeros((3, 3, 5, 2), jnp.bfloat16)
    with pytest.raises(Exception, match="w's I == x's C"):
        jax.block_until_ready(conv(x, w))
