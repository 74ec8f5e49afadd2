"""The levers a GPU run compares (python -m benchmarks.cpu_levers model), each proven here to change only the
speed: sub-pixel up-convolutions, batch norm folded at inference, donated buffers, bf16
compute, the NCHW layout. (Steps per dispatch:
tests/test_train.py::test_scanned_steps_equal_single_steps_and_never_recompile.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.config import TrainConfig
from unet_jax.data.augment import DeviceData, make_sampler
from unet_jax.layers import Conv2D, ConvTranspose2D, MaxPool2D
from unet_jax.losses import get_loss
from unet_jax.models import create_unet, fold_batch_norm
from unet_jax.models.unet import nearest_valid_sizes
from unet_jax.train.state import create_train_state, make_optimizer
from unet_jax.train.steps import get_train_steps, train_steps, train_steps_undonated


@pytest.mark.parametrize(
    "kernel, stride, padding, output_padding",
    [
        (2, 2, "SAME", 0),  # the padded preset's up-convolution
        (3, 2, "SAME", 0),  # the seed preset's (Keras placement)
        (2, 2, "VALID", 0),  # Ronneberger's
        (3, 2, "VALID", 0),  # odd output 2n + 1
        (3, 2, 1, 1),  # PyTorch's (k=3, s=2, p=1, output_padding=1)
        (4, 2, ((2, 0), (1, 1)), 0),  # asymmetric crops
        (5, 2, 2, 1),
        (3, 3, "SAME", 0),
        (1, 2, "VALID", 1),  # a phase without any kernel tap
        ((3, 2), (2, 3), "VALID", 0),  # non-square kernel and strides
    ],
)
def test_subpixel_transposed_convolution_equals_zero_insertion(kernel, stride, padding, output_padding):
    x = jax.random.normal(jax.random.key(0), (2, 5, 7, 3))
    zero = ConvTranspose2D(
        4, kernel, strides=stride, padding=padding, output_padding=output_padding, method="zero_insertion"
    )
    sub = zero.clone(method="subpixel")
    variables = zero.init(jax.random.key(1), x)
    variables = {"params": {**variables["params"], "bias": jax.random.normal(jax.random.key(2), (4,))}}
    a, b = zero.apply(variables, x), sub.apply(variables, x)
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    # Gradients with respect to the input and the kernel, through a random projection.
    probe = jax.random.normal(jax.random.key(3), a.shape)

    def loss(model, v, x):
        return jnp.sum(model.apply(v, x) * probe)

    ga = jax.grad(lambda v, x: loss(zero, v, x), argnums=(0, 1))(variables, x)
    gb = jax.grad(lambda v, x: loss(sub, v, x), argnums=(0, 1))(variables, x)
    for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(w, u, atol=1e-4, rtol=1e-5)


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        ConvTranspose2D(2, method="fft").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def _tiny(preset, **fields):
    return create_unet(preset, features=4, depth=2, **fields)


def _trained_stats(model, x):
    """Variables whose running statistics are a batch's, not the initial (0, 1)."""
    v = model.init(jax.random.key(1), x)
    _, upd = model.apply(v, x * 3.0 + 0.5, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)})
    return {"params": v["params"], "batch_stats": upd["batch_stats"]}


@pytest.mark.parametrize("preset", ["seed", "padded"])
def test_unet_up_method_keeps_parameters_and_outputs(preset):
    model = _tiny(preset)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, model.in_channels))
    v = _trained_stats(model, x)
    sub = model.clone(up_method="subpixel")
    assert jax.tree.structure(sub.init(jax.random.key(1), x)) == jax.tree.structure(v)
    np.testing.assert_allclose(sub.apply(v, x), model.apply(v, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset, fields", [("seed", {}), ("padded", {}), ("padded", {"class_head": 3})])
def test_folded_batch_norm_gives_the_same_inference(preset, fields):
    model = _tiny(preset, **fields)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, model.in_channels))
    v = _trained_stats(model, x)
    folded_model, folded = fold_batch_norm(model, v)
    assert folded_model.norm == "none" and "batch_stats" not in folded
    a, b = model.apply(v, x, train=False), folded_model.apply(folded, x, train=False)
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(w, u, atol=2e-5, rtol=1e-4)
    # Folded parameters are exactly what the folded model expects.
    expected = folded_model.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, expected) == jax.tree.map(jnp.shape, folded)
    # Without batch norm there is nothing to fold.
    plain = create_unet("ronneberger", features=2, depth=1, padding="SAME")
    assert fold_batch_norm(plain, {"params": {}}) == (plain, {"params": {}})


def test_donated_and_undonated_steps_give_the_same_state():
    assert get_train_steps(True) is train_steps and get_train_steps(False) is train_steps_undonated
    model = _tiny("seed")
    rng = np.random.default_rng(0)
    data = DeviceData(
        jnp.asarray(rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)),
        jnp.asarray(rng.integers(0, 2, (8, 32, 32, 1), dtype=np.uint8)),
        jnp.zeros(8, jnp.int32),
    )
    tx = make_optimizer(TrainConfig(batch_size=4), 2)
    keys = jax.random.split(jax.random.key(0), 2)
    common = dict(num_steps=2, sample=make_sampler(4, 8, None), loss_fn=get_loss("bce_dice"), threshold=0.5, mesh=None)
    out = {}
    for donate in (True, False):
        state = create_train_state(model, tx, jax.random.key(3), (1, 32, 32, 3))
        kept = state.params
        new, metrics = get_train_steps(donate)(state, data, keys[0], keys[1], jnp.int32(0), **common)
        if not donate:  # the input state is still alive
            assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(kept))
        out[donate] = jax.device_get((new.params, new.batch_stats, new.opt_state, metrics))
    for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False])):
        np.testing.assert_array_equal(a, b)


def test_bfloat16_compute_gives_the_float32_outputs_to_bf16_precision():
    model = _tiny("padded")
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
    v = _trained_stats(model, x)
    a = model.apply(v, x, train=False)
    b = model.clone(dtype=jnp.bfloat16).apply(v, x, train=False)
    assert b.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    assert float(jnp.max(jnp.abs(a - b))) <= 0.05 * float(jnp.max(jnp.abs(a)))


def test_max_train_minutes_is_range_checked():
    assert TrainConfig(max_train_minutes=0.5).max_train_minutes == 0.5
    with pytest.raises(ValueError, match="max_train_minutes"):
        TrainConfig(max_train_minutes=0)


def _nchw(x):
    return jnp.transpose(x, (0, 3, 1, 2))


@pytest.mark.parametrize(
    "layer",
    [
        Conv2D(4, 3, strides=2, padding="SAME"),
        Conv2D(4, (3, 2), padding=((1, 0), (2, 1)), use_bias=True),
        MaxPool2D(3, strides=2, padding="SAME"),
        ConvTranspose2D(4, 3, strides=2, padding="SAME"),
        ConvTranspose2D(4, 3, strides=2, padding=1, output_padding=1, method="subpixel"),
        ConvTranspose2D(4, 1, strides=2, padding="VALID", output_padding=1, method="subpixel"),
    ],
)
def test_each_layer_in_nchw_is_the_nhwc_layer_transposed(layer):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
    v = layer.init(jax.random.key(1), x)
    if "params" in v:  # a bias that is not zero, so its broadcast is checked too
        v = {"params": {**v["params"], "bias": jax.random.normal(jax.random.key(2), v["params"]["bias"].shape)}}
    chw = layer.clone(layout="NCHW")
    assert jax.tree.map(jnp.shape, chw.init(jax.random.key(1), _nchw(x))) == jax.tree.map(jnp.shape, v)
    np.testing.assert_allclose(chw.apply(v, _nchw(x)), _nchw(layer.apply(v, x)), atol=1e-5, rtol=1e-5)


def test_an_unknown_layout_or_a_wrong_rank_is_refused_by_name():
    with pytest.raises(ValueError, match="layout must be one of"):
        Conv2D(2, layout="HWCN").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"input has 4 channels .*NCHW\), expected 1"):
        Conv2D(2, in_features=1, layout="NCHW").init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"model.layout = 'CHWN': expected one of \['NHWC', 'NCHW'\]"):
        _tiny("padded", layout="CHWN").init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))


@pytest.mark.parametrize(
    "preset, fields",
    [("seed", {}), ("padded", {"class_head": 3, "up_method": "subpixel"}), ("ronneberger", {"norm": "batch"})],
)
def test_unet_in_nchw_keeps_parameters_and_outputs(preset, fields):
    model = create_unet(preset, features=4, depth=1, **fields)
    size = 32 if model.padding == "SAME" else nearest_valid_sizes(28, **model._size_spec())[1]
    x = jax.random.uniform(jax.random.key(0), (2, size, size, model.in_channels))
    v = _trained_stats(model, x)
    chw = model.clone(layout="NCHW")
    assert jax.tree.structure(chw.init(jax.random.key(1), x)) == jax.tree.structure(v)
    for u, w in zip(jax.tree.leaves(model.apply(v, x)), jax.tree.leaves(chw.apply(v, x))):
        np.testing.assert_allclose(w, u, atol=1e-5, rtol=1e-5)


def test_unet_in_nchw_trains_alike():
    """One training-mode pass: the loss, its gradient and the new running averages."""
    # (A preset without dropout: dropout draws its mask in the activations' logical shape,
    # so one key gives other masks, from the same distribution, in NCHW.)
    model = create_unet("padded", features=4, depth=1, class_head=3)
    chw = model.clone(layout="NCHW")
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
    v = _trained_stats(model, x)

    def loss(m, params):
        out, upd = m.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        return sum(jnp.sum(jnp.sin(o)) for o in jax.tree.leaves(out)), upd

    (la, ua), ga = jax.value_and_grad(lambda p: loss(model, p), has_aux=True)(v["params"])
    (lb, ub), gb = jax.value_and_grad(lambda p: loss(chw, p), has_aux=True)(v["params"])
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    # float32 sums in another order: errors relative to the gradients' scale (the biases
    # before batch norm have gradients that are zero but for rounding).
    scale = max(float(np.max(np.abs(u))) for u in jax.tree.leaves(ga))
    for u, w in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(w, u, rtol=1e-4, atol=1e-5 * scale)
    for u, w in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
        np.testing.assert_allclose(w, u, rtol=1e-5, atol=1e-5)
