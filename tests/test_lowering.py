"""The convolution lowerings (unet_jax.layers.lowering), as tests.

Read top to bottom: the Winograd matrices in one dimension, every lowering against the
literal sum (unet_jax.layers.reference.conv2d), gradients against XLA's convolution, Conv2D's
``lowering`` field and its errors, float32 rounding of Winograd against float64, and the
tuned table that ``'auto'`` reads.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_jax.layers import Conv2D, reference
from unet_jax.layers import lowering as L
from unet_jax.models.unet import UNet

NON_LAX = tuple(n for n in L.LOWERINGS if n != "lax")


def run_lowering(name, x, w, pads):
    return np.asarray(L.lower_conv(name, jnp.asarray(x), jnp.asarray(w), (1, 1), pads))


@functools.partial(jax.jit, static_argnums=2)
def _all_lowerings(x, w, pads):
    # One program per shape for all four: each new shape costs a compile, the test's time.
    return [L.lower_conv(name, x, w, (1, 1), pads) for name in L.LOWERINGS]


def literal(x, w, pads):
    return np.stack([reference.conv2d(xi, w, 1, pads) for xi in x])


# --------------------------------------------------------------------------------------
# 1. Winograd in one dimension: A^T [(G g) (.) (B^T d)] is the 3-tap correlation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [2, 4])
def test_winograd_1d_is_correlation(m):
    mats = L.winograd_matrices(m)
    rng = np.random.default_rng(m)
    d, g = rng.standard_normal(m + 2), rng.standard_normal(3)
    y = mats["AT"] @ ((mats["G"] @ g) * (mats["BT"] @ d))
    np.testing.assert_allclose(y, [d[i : i + 3] @ g for i in range(m)], atol=1e-12)


def test_winograd_multiply_counts():
    # (m + 2)^2 multiplies per m^2 outputs, against 9 m^2 for the direct sum.
    for m, (wino, direct) in {2: (16, 36), 4: (36, 144)}.items():
        assert L.winograd_matrices(m)["BT"].shape[0] ** 2 == wino and 9 * m * m == direct


# --------------------------------------------------------------------------------------
# 2. Every lowering equals the literal sum
# --------------------------------------------------------------------------------------
pads_st = st.one_of(
    st.just("SAME"),
    st.just("VALID"),
    st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.tuples(st.integers(0, 2), st.integers(0, 2))),
)


@settings(max_examples=10)  # every example compiles a new program (~1 s on a loaded core)
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    c_in=st.integers(1, 4),
    c_out=st.integers(1, 4),
    pads=pads_st,
    seed=st.integers(0, 2**16),
)
def test_lowerings_equal_literal_sum(n, h, w, c_in, c_out, pads, seed):
    pads = {"SAME": ((1, 1), (1, 1)), "VALID": ((0, 0), (0, 0))}.get(pads, pads) if isinstance(pads, str) else pads
    if h + sum(pads[0]) < 3 or w + sum(pads[1]) < 3:
        pads = ((1, 1), (1, 1))  # smaller than the kernel: no output to compare
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c_in)).astype(np.float32)
    k = rng.standard_normal((3, 3, c_in, c_out)).astype(np.float32)
    expected = literal(x, k, pads)
    for name, got in zip(L.LOWERINGS, _all_lowerings(jnp.asarray(x), jnp.asarray(k), pads)):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("kernel, stride", [((1, 1), 1), ((2, 3), 1), ((3, 3), 2), ((3, 2), (2, 1))])
def test_direct_and_im2col_other_kernels_and_strides(kernel, stride):
    stride = (stride, stride) if isinstance(stride, int) else stride
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    k = rng.standard_normal((*kernel, 3, 2)).astype(np.float32)
    pads = ((1, 0), (0, 1))
    expected = np.asarray(L.conv_lax(jnp.asarray(x), jnp.asarray(k), stride, pads, jax.lax.Precision.HIGHEST))
    for conv in (L.conv_direct, L.conv_stem, L.conv_im2col):
        y = np.asarray(conv(jnp.asarray(x), jnp.asarray(k), stride, pads))
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4, err_msg=conv.__name__)


# --------------------------------------------------------------------------------------
# 3. Gradients (autodiff of each forward) equal XLA's convolution's
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, pads", [((2, 7, 5, 3, 4), ((1, 1), (1, 1))), ((1, 4, 9, 2, 3), ((0, 2), (1, 0)))])
def test_gradients_equal_lax(shape, pads):
    n, h, w, c_in, c_out = shape
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((n, h, w, c_in)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out)), jnp.float32)
    ho, wo = h + sum(pads[0]) - 2, w + sum(pads[1]) - 2
    probe = jnp.asarray(rng.standard_normal((n, ho, wo, c_out)), jnp.float32)

    @jax.jit
    def grads(x, k):
        def loss(x, k, lowering):
            return jnp.sum(L.lower_conv(lowering, x, k, (1, 1), pads, jax.lax.Precision.HIGHEST) * probe)

        return {name: jax.grad(loss, argnums=(0, 1))(x, k, name) for name in L.LOWERINGS}

    found = grads(x, k)
    for name in NON_LAX:
        for got, want in zip(found[name], found["lax"]):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize(
    "kernel, stride, pads", [((3, 3), (1, 1), ((1, 1), (1, 1))), ((3, 2), (2, 1), ((1, 0), (0, 2)))]
)
def test_stem_kernel_gradient_is_the_patch_product(kernel, stride, pads):
    # conv_stem's kernel gradient is written out (P^T dY), not autodiff: against XLA's on
    # 1- and 3-channel inputs, strided and asymmetric; and, as in a network's first layer,
    # the kernel gradient alone (the input gradient then dead code) gives the same numbers.
    rng = np.random.default_rng(3)
    for c_in in (1, 3):
        x = jnp.asarray(rng.standard_normal((2, 9, 8, c_in)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((*kernel, c_in, 5)), jnp.float32)
        y = L.conv_lax(x, k, stride, pads)
        probe = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)

        def loss(x, k, name):
            return jnp.sum(L.lower_conv(name, x, k, stride, pads, jax.lax.Precision.HIGHEST) * probe)

        want = jax.grad(loss, argnums=(0, 1))(x, k, "lax")
        got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, k, "stem")
        only_w = jax.jit(jax.grad(loss, argnums=1), static_argnums=2)(x, k, "stem")
        for a, b in ((got[0], want[0]), (got[1], want[1]), (only_w, want[1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# 4. Conv2D(lowering=...)
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_conv2d_forced_lowering_equals_lax(layout):
    x = jax.random.normal(jax.random.key(0), (2, 6, 5, 3) if layout == "NHWC" else (2, 3, 6, 5))
    variables = Conv2D(4, layout=layout).init(jax.random.key(1), x)
    names = ("lax", *NON_LAX, "auto")
    outs = jax.jit(lambda v, x: [Conv2D(4, layout=layout, lowering=n).apply(v, x) for n in names])(variables, x)
    for name, got in zip(names, outs):
        np.testing.assert_allclose(np.asarray(got), np.asarray(outs[0]), rtol=1e-4, atol=1e-4, err_msg=name)


def test_conv2d_bad_lowering_names_the_value():
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError, match="'fft'"):
        Conv2D(2, lowering="fft").init(jax.random.key(0), x)


def test_conv2d_winograd_refuses_stride_and_kernel():
    x = jnp.zeros((1, 8, 8, 2))
    with pytest.raises(ValueError, match=r"winograd2.*strides \(2, 2\)"):
        Conv2D(2, strides=2, lowering="winograd2").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"winograd4.*kernel \(5, 5\)"):
        Conv2D(2, kernel_size=5, lowering="winograd4").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="feature_group_count 2"):
        Conv2D(2, feature_group_count=2, lowering="im2col").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="m must be one of"):
        L.conv_winograd(x, jnp.zeros((3, 3, 2, 2)), m=3)
    # 'auto' falls back to lax where the forced lowerings cannot apply.
    for kw in (dict(strides=2), dict(kernel_size=5), dict(feature_group_count=2)):
        Conv2D(2, lowering="auto", **kw).init(jax.random.key(0), x)


def test_unet_lowering_keeps_parameters():
    kw = dict(features=4, depth=1, convs_per_block=1, in_channels=1)
    x = jnp.ones((1, 8, 8, 1))
    variables = jax.jit(UNet(**kw).init)(jax.random.key(0), x)
    other = jax.eval_shape(UNet(**kw, lowering="winograd2").init, jax.random.key(0), x)
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(other)
    want, got = jax.jit(lambda v, x: [UNet(**kw, lowering=n).apply(v, x) for n in ("lax", "winograd2")])(variables, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------
# 5. float32 rounding against float64
# --------------------------------------------------------------------------------------
def _relative_error(name):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 32, 32, 64))
    k = rng.standard_normal((3, 3, 64, 64)) / 24.0
    pads = ((1, 1), (1, 1))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # float64 reference: the literal sum, vectorised over pixels and channels.
    exact = sum(np.einsum("nhwc,co->nhwo", xp[:, u : u + 32, v : v + 32], k[u, v]) for u in range(3) for v in range(3))
    got = run_lowering(name, x.astype(np.float32), k.astype(np.float32), pads)
    return np.abs(got - exact).max() / np.abs(exact).max()


@pytest.mark.parametrize("name, bound", [("lax", 2e-6), ("im2col", 2e-6), ("winograd2", 2e-6), ("winograd4", 2e-5)])
def test_float32_error_against_float64(name, bound):
    # Measured (max |error| / max |exact|, one 32x32 image, 64 -> 64 channels): lax 7.2e-7,
    # im2col 6.7e-7, F(2, 3) 3.3e-7, F(4, 3) 7.8e-6. F(2, 3)'s matrices hold only 0, +-1
    # and 1/2 (exact in float32); F(4, 3)'s larger points (entries up to 8 in A^T, 5 in
    # B^T, 1/6 and 1/24 in G) cost about 10x more rounding: still far below bfloat16's.
    assert _relative_error(name) < bound


# --------------------------------------------------------------------------------------
# 6. The tuned table and 'auto'
# --------------------------------------------------------------------------------------
def _write_table(path, entries):
    from unet_jax._io import write_json

    write_json(path, {"format": L.TABLE_FORMAT, "machine": "test", "entries": entries})


def test_auto_reads_the_table(tmp_path, monkeypatch):
    path = tmp_path / "table.json"
    monkeypatch.setenv(L.TABLE_ENV, str(path))
    assert L.table_path() == path
    assert L.choose_lowering(6, 5, 3, 4, batch=2) == "lax"  # no table yet
    _write_table(
        path,
        {
            L.table_key(6, 5, 3, 4, 8, "infer"): {"best": "winograd4"},
            L.table_key(6, 5, 3, 4, 8, "train"): {"best": "im2col"},
        },
    )
    assert json.loads(path.read_text())["format"] == L.TABLE_FORMAT
    assert L.choose_lowering(6, 5, 3, 4, batch=2) == "winograd4"  # nearest bucket: 8
    assert L.choose_lowering(6, 5, 3, 4, batch=8, mode="train") == "im2col"
    assert L.choose_lowering(6, 5, 3, 8, batch=8) == "lax"  # another shape
    assert L.choose_lowering(6, 5, 3, 4, batch=8, pads=((0, 0), (0, 0))) == "lax"

    x = jax.random.normal(jax.random.key(0), (8, 6, 5, 3))
    variables = Conv2D(4).init(jax.random.key(1), x)
    seen = []
    real = L.lower_conv
    monkeypatch.setattr(L, "lower_conv", lambda name, *a: seen.append(name) or real(name, *a))
    Conv2D(4, lowering="auto").apply(variables, x)
    Conv2D(4, lowering="auto-train").apply(variables, x)
    Conv2D(4, lowering="auto").apply(variables, x[..., :2, :])  # 6x2: not in the table
    assert seen == ["winograd4", "im2col"]


def test_predict_and_evaluate_take_the_tuned_lowerings_on_the_cpu(tmp_path, monkeypatch):
    # with_tuned_lowering (what `unet-jax predict` / `evaluate` load through): without a
    # table the model is left alone; with one, the first layer computes as the table says
    # and the output is the same.
    from _train_helpers import TINY, save_untrained_run

    from unet_jax.inference import load, predict_outputs, with_tuned_lowering

    run = tmp_path / "run"
    save_untrained_run(run)
    loaded = load(run)
    monkeypatch.setenv(L.TABLE_ENV, str(tmp_path / "table.json"))
    assert with_tuned_lowering(loaded) is loaded  # no table yet
    size, c_in, c_out = TINY.image_size, loaded.model.in_channels, loaded.model.features
    _write_table(tmp_path / "table.json", {L.table_key(size, size, c_in, c_out, 2, "infer"): {"best": "direct"}})
    tuned = with_tuned_lowering(loaded)
    assert tuned.model.lowering == "auto" and tuned.variables is loaded.variables
    seen = []
    real = L.lower_conv
    monkeypatch.setattr(L, "lower_conv", lambda name, *a: seen.append(name) or real(name, *a))
    images = np.random.default_rng(0).integers(0, 256, (2, size, size, c_in), dtype=np.uint8)
    want, _ = predict_outputs(loaded, images, False, batch_size=2)
    got, _ = predict_outputs(tuned, images, False, batch_size=2)
    assert seen == ["direct"]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_a_damaged_table_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "lowering.json"
    path.write_text('{"format": "unet_jax.lowering_table", "entries": {')  # cut short
    with pytest.raises(ValueError, match=r"lowering\.json: not a lowering table .*delete it to tune again"):
        L.load_table(path)
    path.write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match=r"lowering\.json: not a lowering table \(expected format"):
        L.load_table(path)
