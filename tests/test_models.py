"""The U-Net family: presets, shapes, parameter counts, input-size rules, train/eval modes."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from unet_jax.cli import main
from unet_jax.models import (
    PRESETS,
    CropConcat,
    UNet,
    check_input_size,
    create_unet,
    nearest_valid_sizes,
    unet_output_size,
)
from unet_jax.summary import summarize


def count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def init_key(seed: int) -> jax.Array:
    """A key for ``model.init`` that is cheap to compile.

    The default threefry hash is compiled once per differently shaped parameter, and on a
    CPU that dominates a U-Net's init (tens of seconds); 'rbg' (XLA's RngBitGenerator)
    compiles in a fraction of it. These tests need random weights, not a particular stream.
    """
    return jax.random.key(seed, impl="rbg")


def abstract_variables(model: UNet, size: int):
    x = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def closed_form_params(features, depth, convs, k, up_k, c_in, classes, bias, batch_norm):
    """Trainable and non-trainable counts from the layer widths alone.

    conv: k*k*c_in*c_out (+ c_out bias); batch norm: scale and offset trainable, running
    mean and variance not; up-convolution: up_k*up_k*c_in*c_out + c_out.
    """
    trainable = non_trainable = 0

    def block(c_in, c_out):
        nonlocal trainable, non_trainable
        for i in range(convs):
            trainable += k * k * (c_in if i == 0 else c_out) * c_out + (c_out if bias else 0)
            if batch_norm:
                trainable += 2 * c_out
                non_trainable += 2 * c_out

    widths = [features * 2**level for level in range(depth + 1)]
    previous = c_in
    for w in widths:  # encoder blocks, then the bottleneck
        block(previous, w)
        previous = w
    for w in reversed(widths[:-1]):
        trainable += up_k * up_k * previous * w + w  # up-convolution halves the channels
        block(2 * w, w)  # after concatenation with the skip
        previous = w
    trainable += previous * classes + classes  # 1x1 head
    return trainable, non_trainable


# --------------------------------------------------------------------------------------
# Pinned parameter counts
# --------------------------------------------------------------------------------------
def test_seed_preset_reproduces_the_keras_counts():
    # model.summary() of the report's notebook: 3,145,361 trainable, 4,416 non-trainable.
    variables = abstract_variables(create_unet("seed"), 256)
    assert count(variables["params"]) == 3_145_361
    assert count(variables["batch_stats"]) == 4_416
    assert closed_form_params(16, 4, 3, 3, 3, 3, 1, True, True) == (3_145_361, 4_416)


def test_ronneberger_preset_counts():
    variables = abstract_variables(create_unet("ronneberger"), 572)
    assert count(variables["params"]) == 31_030_658
    assert set(variables) == {"params"}  # no batch norm in 2015
    assert closed_form_params(64, 4, 2, 3, 2, 1, 2, True, False) == (31_030_658, 0)


def test_padded_preset_counts():
    variables = abstract_variables(create_unet("padded"), 256)
    assert count(variables["params"]) == 31_036_481
    assert count(variables["batch_stats"]) == 11_776
    assert closed_form_params(64, 4, 2, 3, 2, 1, 1, False, True) == (31_036_481, 11_776)


# --------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------
def test_ronneberger_has_23_conv_layers_and_maps_572_to_388():
    summary = summarize("ronneberger", size=(572, 572))
    assert summary.conv_layers == 23  # 18 3x3 + 4 up-convolutions + the 1x1 head
    assert summary.output_shape == (1, 388, 388, 2)
    shapes = {row.name: row.output_shape for row in summary.layers}
    # Figure 1 of Ronneberger et al.: 568 after the first block, 28x28x1024 at the bottom,
    # 56x56x512 after the first up-convolution (cropped skip 64 -> 56).
    assert shapes["enc1/conv2"] == (1, 568, 568, 64)
    assert shapes["bottleneck/conv2"] == (1, 28, 28, 1024)
    assert shapes["up4"] == (1, 56, 56, 512)
    assert shapes["concat4"] == (1, 56, 56, 1024)


@pytest.mark.parametrize(
    "preset, size, expected",
    [
        ("ronneberger", 572, 388),
        ("ronneberger", 252, 68),
        ("seed", 256, 256),
        ("seed", 128, 128),
        ("padded", 256, 256),
        ("padded", 96, 96),
    ],
)
def test_preset_output_shapes(preset, size, expected):
    model = create_unet(preset)
    x = jax.ShapeDtypeStruct((2, size, size, model.in_channels), jnp.float32)
    variables = abstract_variables(model, size)
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert out.shape == (2, expected, expected, model.num_classes)
    assert out.dtype == jnp.float32
    assert unet_output_size(size, **model._size_spec()) == expected


def test_valid_mode_forward_crops_skips_and_computes():
    # A narrow 2015 network run for real: 188 -> 4 (every valid input loses 184 pixels).
    # init_with_output runs the same forward pass as apply, in one compilation, not two.
    model = create_unet("ronneberger", features=2)
    x = jax.random.normal(jax.random.key(0), (1, 188, 188, 1))
    y, _ = jax.jit(model.init_with_output)(init_key(1), x)
    assert y.shape == (1, 4, 4, 2)
    assert bool(jnp.all(jnp.isfinite(y)))


def test_non_square_inputs():
    model = create_unet("seed", features=4)
    y, _ = jax.jit(model.init_with_output)(init_key(0), jnp.ones((1, 32, 64, 3)))
    assert y.shape == (1, 32, 64, 1)


def test_crop_concat_takes_the_centre_of_the_skip_and_puts_up_first():
    # A 6x6 skip against a 2x2 up-sampled map: (6 - 2) / 2 = 2 rows and columns are cut
    # on every side (Ronneberger et al. Fig. 1), so the centre skip[2:4, 2:4] remains.
    # Channels are [up, skip], the notebook's concatenate([u, c]).
    skip = jnp.arange(36, dtype=jnp.float32).reshape(1, 6, 6, 1)
    up = jnp.array([[-1.0, -2.0], [-3.0, -4.0]]).reshape(1, 2, 2, 1)
    out = CropConcat().apply({}, skip, up)
    expected = jnp.concatenate([up, skip[:, 2:4, 2:4]], axis=-1)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out[0, :, :, 1], [[14, 15], [20, 21]])


# --------------------------------------------------------------------------------------
# Input-size rules
# --------------------------------------------------------------------------------------
def test_same_mode_refuses_sizes_not_divisible_by_2_to_the_depth():
    # The message names the wrong axis: height 250 here, width 250 below.
    model = create_unet("seed")
    with pytest.raises(
        ValueError, match=r"input height 250 .*multiple of 2\*\*depth = 16.*nearest valid sizes: 240 or 256"
    ):
        model.init(jax.random.key(0), jnp.ones((1, 250, 256, 3)))
    with pytest.raises(ValueError, match=r"input width 250 .*nearest valid sizes: 240 or 256"):
        model.init(jax.random.key(0), jnp.ones((1, 256, 250, 3)))


def test_valid_mode_refuses_sizes_that_do_not_pool_evenly():
    spec = create_unet("ronneberger")._size_spec()
    assert nearest_valid_sizes(570, **spec) == (556, 572)
    assert check_input_size((572, 188), spec) == (388, 4)
    with pytest.raises(ValueError, match=r"input height 570 .*VALID mode.*nearest valid sizes: 556 or 572"):
        check_input_size((570, 572), spec)
    with pytest.raises(ValueError, match=r"input width 100 .*nearest valid sizes: 188"):
        check_input_size((572, 100), spec)  # too small: nothing valid below
    with pytest.raises(ValueError, match=r"input size 570 .*nearest valid sizes: 556 or 572"):
        unet_output_size(570, **spec)  # one length on its own: no axis to name


@pytest.mark.parametrize("hw, axis, value", [((0, 256), "height", 0), ((256, -16), "width", -16)])
def test_non_positive_sizes_are_refused_as_such(hw, axis, value):
    # Not "cannot pass the pooling steps": a size below 1 is no size at all.
    spec = create_unet("seed")._size_spec()
    with pytest.raises(
        ValueError, match=rf"input {axis} must be a positive integer, got {value}; smallest valid size: 16"
    ):
        check_input_size(hw, spec)


def test_wrong_input_channels_are_refused():
    with pytest.raises(ValueError, match=r"input must be \(batch, height, width, 3\), got shape \(1, 32, 32, 1\)"):
        create_unet("seed").init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))


def test_unknown_preset_and_field_are_refused():
    with pytest.raises(ValueError, match=r"unknown preset 'unet\+\+'; expected one of"):
        create_unet("unet++")
    with pytest.raises(ValueError, match=r"unknown UNet field\(s\) \['width'\]"):
        create_unet("seed", width=3)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("dropout_rate", 2.0, "a probability in [0, 1)"),
        ("dropout_rate", -0.5, "a probability in [0, 1)"),
        ("convs_per_block", 0, "a positive integer"),
        ("bn_momentum", 5.0, "a number in [0, 1]"),
        ("depth", 0, "a positive integer"),
        ("depth", -1, "a positive integer"),
        ("num_classes", 0, "a positive integer"),
        ("features", 2.5, "a positive integer"),
        ("kernel_size", 2, "an odd size with padding 'SAME'"),
        ("class_head", -1, "an integer >= 0"),
        ("padding", "same", "one of ['SAME', 'VALID']"),
    ],
)
def test_bad_model_fields_are_refused_naming_the_field(field, value, expected, tmp_path, capsys):
    # Before: trained (dropout_rate=2, depth=0, ...) or an error blaming another field / the input size.
    with pytest.raises(ValueError, match=rf"model\.{field} = {re.escape(repr(value))}: expected {re.escape(expected)}"):
        create_unet("padded", **{field: value})
    assert main(["train", "--out", str(tmp_path / "run"), f"model.{field}={value}"]) == 2
    err = capsys.readouterr().err
    assert f"model.{field}" in err and err.count("\n") == 1, err  # a wrong type is the parser's error
    assert not (tmp_path / "run").exists()


def test_valid_mode_takes_an_even_kernel_and_every_preset_passes_its_checks():
    assert create_unet("ronneberger", kernel_size=2).kernel_size == 2
    from unet_jax.models import create_model, model_names

    for names in model_names().values():
        for name in names:
            create_model(name)


def test_presets_are_keyword_sets_of_one_definition():
    fields = set(UNet.__dataclass_fields__)
    for name, kwargs in PRESETS.items():
        assert set(kwargs) <= fields, name
        assert isinstance(create_unet(name), UNet)


# --------------------------------------------------------------------------------------
# Train and eval modes
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_seed():
    model = create_unet("seed", features=4, depth=2)
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    variables = jax.jit(model.init)(init_key(1), x)
    return model, variables, x


def test_train_mode_uses_batch_statistics_and_updates_running_averages(small_seed):
    model, variables, x = small_seed
    _, updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_seed_preset_drops_out_after_every_pooling_and_concatenation():
    # The notebook: Dropout(0.2) right after each MaxPooling2D and each concatenate.
    model = create_unet("seed")
    assert model.dropout_rate == 0.2
    rates = {}

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dropout):
            rates[context.module.name] = context.module.rate
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        summary = summarize("seed", size=(32, 32))
    names = [row.name for row in summary.layers]
    kinds = {row.name: row.kind for row in summary.layers}
    for level in range(1, 5):
        for layer, dropout in ((f"pool{level}", f"drop_pool{level}"), (f"concat{level}", f"drop_concat{level}")):
            assert kinds[dropout] == "Dropout"
            assert names.index(dropout) == names.index(layer) + 1  # directly after it
            assert rates[dropout] == 0.2
    assert len(rates) == 8


def test_dropout_rate_zero_makes_training_independent_of_the_key(small_seed):
    model, variables, x = small_seed
    model = model.clone(dropout_rate=0.0)

    def train(key):
        return model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0]

    np.testing.assert_array_equal(train(jax.random.key(3)), train(jax.random.key(4)))


def test_dropout_needs_a_key_in_training_and_is_off_in_evaluation(small_seed):
    model, variables, x = small_seed

    def train(key):
        return model.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0]

    assert not np.allclose(train(jax.random.key(3)), train(jax.random.key(4)))
    np.testing.assert_array_equal(train(jax.random.key(3)), train(jax.random.key(3)))
    np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))


def test_bfloat16_compute_stays_close_to_float32(small_seed):
    model, variables, x = small_seed
    y32 = model.apply(variables, x)
    y16 = model.clone(dtype=jnp.bfloat16).apply(variables, x)
    assert y16.dtype == jnp.float32  # logits come back in float32
    scale = float(jnp.max(jnp.abs(y32)))
    assert float(jnp.max(jnp.abs(y16 - y32))) <= 0.05 * scale


def test_jitted_forward_does_not_recompile_for_new_data(small_seed):
    model, variables, x = small_seed
    forward = jax.jit(lambda v, x: model.apply(v, x))
    forward(variables, x).block_until_ready()
    forward(variables, x + 1.0).block_until_ready()
    forward(jax.tree.map(lambda a: a * 1.5, variables), x).block_until_ready()
    assert forward._cache_size() == 1


def test_layer_names_are_explicit(small_seed):
    _, variables, _ = small_seed
    assert set(variables["params"]) == {"enc1", "enc2", "bottleneck", "up2", "up1", "dec2", "dec1", "head"}
    assert set(variables["params"]["enc1"]) == {"conv1", "conv2", "conv3", "bn1", "bn2", "bn3"}


# --------------------------------------------------------------------------------------
# `unet-jax summary`
# --------------------------------------------------------------------------------------
def test_summary_json(capsys):
    assert main(["summary", "--preset", "seed", "--size", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output_shape"] == [1, 256, 256, 1]
    assert report["conv_layers"] == 32  # 9 blocks x 3 convs + 4 up-convolutions + head
    assert report["trainable_params"] == 3_145_361
    assert report["non_trainable_params"] == 4_416
    assert sum(layer["trainable_params"] for layer in report["layers"]) == 3_145_361


def test_summary_table_lists_every_layer(capsys):
    assert main(["summary", "--preset", "ronneberger"]) == 0
    text = capsys.readouterr().out
    assert "enc1/conv1 (Conv2D)" in text and "(1, 570, 570, 64)" in text
    assert "up4 (ConvTranspose2D)" in text
    assert "Convolutional layers: 23" in text
    assert "Trainable params: 31,030,658" in text


def test_summary_rectangular_and_bad_sizes(capsys):
    assert main(["summary", "--preset", "padded", "--size", "128", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_shape"] == [1, 128, 64, 1]
    assert main(["summary", "--preset", "seed", "--size", "250"]) == 2
    err = capsys.readouterr().err
    assert "input height 250" in err and "nearest valid sizes: 240 or 256" in err
    assert main(["summary", "--preset", "seed", "--size", "256", "0"]) == 2
    assert "input width must be a positive integer, got 0" in capsys.readouterr().err


def test_the_package_exports_the_user_api_lazily():
    import subprocess
    import sys

    code = (
        "import sys, unet_jax; assert 'unet_jax.train.loop' not in sys.modules; "
        "from unet_jax import train_model, TrainConfig, load_checkpoint, evaluate_dataset, predict_files; "
        "import unet_jax.train.loop as loop; assert train_model is loop.train; print(sorted(unet_jax.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "train_model" in out and "Conv2D" in out
