"""Two training levers of issue 19: an exponential moving average of the weights, and deep
supervision (auxiliary heads on the coarser decoder levels, nnU-Net's loss)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_helpers import TINY

from unet_jax.config import TrainConfig
from unet_jax.data.augment import Batch
from unet_jax.inference import load
from unet_jax.losses import get_loss
from unet_jax.models import create_unet, init_variables, run_model
from unet_jax.train import train
from unet_jax.train.checkpoint import CheckpointStore
from unet_jax.train.state import create_train_state, make_optimizer
from unet_jax.train.steps import deep_supervision_loss, downsample_masks, train_step

BCE = get_loss("bce")


def _batch(n: int = 4, size: int = 16) -> Batch:
    rng = np.random.default_rng(0)
    masks = (rng.random((n, size, size, 1)) < 0.3).astype(np.float32)
    images = rng.random((n, size, size, 1)).astype(np.float32)
    return Batch(
        images=jnp.asarray(images),
        masks=jnp.asarray(masks),
        labels=jnp.zeros(n, jnp.int32),
        index=jnp.arange(n, dtype=jnp.int32),
    )


def _state(ema_decay: float, **model):
    unet = create_unet("seed", in_channels=1, features=4, depth=2, **model)
    return create_train_state(unet, optax.sgd(0.1), jax.random.key(0, impl="rbg"), (1, 16, 16, 1), ema_decay=ema_decay)


# --------------------------------------------------------------------------------------
# EMA


def test_ema_follows_its_closed_form_with_the_warm_up():
    """After step t (0-based) the average is d * ema + (1 - d) * new, d = min(decay,
    (1 + t) / (10 + t)): 0.1 after the first step, 2/11 after the second."""
    state = _state(0.9)
    init = state.params
    leaf = lambda tree: np.asarray(tree["enc1"]["conv1"]["kernel"])  # noqa: E731
    state1, _ = train_step(state, _batch(), jax.random.key(1), loss_fn=BCE)
    np.testing.assert_allclose(leaf(state1.ema["params"]), 0.1 * leaf(init) + 0.9 * leaf(state1.params), atol=1e-6)
    state2, _ = train_step(state1, _batch(), jax.random.key(1), loss_fn=BCE)
    d = 2 / 11
    expected = d * leaf(state1.ema["params"]) + (1 - d) * leaf(state2.params)
    np.testing.assert_allclose(leaf(state2.ema["params"]), expected, atol=1e-6)
    # the batch statistics are averaged too, and differ from the raw ones after a step
    raw = np.asarray(jax.tree.leaves(state2.batch_stats)[0])
    avg = np.asarray(jax.tree.leaves(state2.ema["batch_stats"])[0])
    assert not np.allclose(raw, avg)


def test_without_ema_the_state_has_none_and_deploys_itself():
    state = _state(0.0)
    assert state.ema is None
    assert state.deployed() is state
    state, _ = train_step(state, _batch(), jax.random.key(1), loss_fn=BCE)
    assert state.ema is None


def test_the_deployed_state_holds_the_average():
    state, _ = train_step(_state(0.99), _batch(), jax.random.key(1), loss_fn=BCE)
    deployed = state.deployed()
    for a, b in zip(jax.tree.leaves(deployed.params), jax.tree.leaves(state.ema["params"])):
        np.testing.assert_array_equal(a, b)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(deployed.params), jax.tree.leaves(state.params)))


def test_config_refuses_a_decay_outside_0_1():
    with pytest.raises(ValueError, match="ema_decay = 1.0"):
        TrainConfig(ema_decay=1.0)


def test_a_checkpoint_resumes_with_its_average_and_inference_loads_the_average(tmp_path):
    state, _ = train_step(_state(0.99), _batch(), jax.random.key(1), loss_fn=BCE)
    store = CheckpointStore(tmp_path)
    store.save("latest", state, {"loop": {}})
    restored, _ = store.restore("latest", _state(0.99))
    store.close()
    for a, b in zip(jax.tree.leaves(restored.ema), jax.tree.leaves(state.ema)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_a_trained_run_with_ema_deploys_the_average(tmp_path):
    """End to end: the run's best checkpoint holds the raw weights and their average;
    inference.load gives the average, and the run's validation Dice is the average's."""
    config = dataclasses.replace(TINY, epochs=2, ema_decay=0.9, tune_inference=False)
    run_dir = tmp_path / "run"
    train(config, run_dir)
    loaded = load(run_dir)
    store = CheckpointStore(run_dir)
    state = create_train_state(
        create_unet("seed", in_channels=1, **config.model),
        make_optimizer(config, 5),
        jax.random.key(0, impl="rbg"),
        (1, 32, 32, 1),
        ema_decay=0.9,
    )
    restored, _ = store.restore("best", state)
    store.close()
    for a, b in zip(jax.tree.leaves(loaded.variables["params"]), jax.tree.leaves(restored.ema["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not all(
        np.allclose(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(loaded.variables["params"]), jax.tree.leaves(restored.params))
    )


# --------------------------------------------------------------------------------------
# Deep supervision


def test_downsample_masks_is_the_block_mean():
    masks = jnp.zeros((1, 4, 4, 1)).at[0, :2, :2, 0].set(1.0).at[0, 2, 2, 0].set(1.0)
    out = downsample_masks(masks, (2, 2))
    np.testing.assert_array_equal(np.asarray(out[0, :, :, 0]), [[1.0, 0.0], [0.0, 0.25]])
    with pytest.raises(ValueError, match="do not divide"):
        downsample_masks(jnp.zeros((1, 5, 5, 1)), (2, 2))


def test_deep_supervision_loss_weights_1_half_quarter_normalised():
    masks = jnp.ones((1, 8, 8, 1))
    aux = (jnp.zeros((1, 4, 4, 1)), jnp.full((1, 2, 2, 1), 2.0))
    main = jnp.float32(1.0)
    expected = (1.0 + 0.5 * np.log(2.0) + 0.25 * np.log1p(np.exp(-2.0))) / 1.75
    np.testing.assert_allclose(float(deep_supervision_loss(main, aux, masks, BCE)), expected, rtol=1e-6)


def test_aux_heads_come_out_in_training_only_with_the_same_parameters():
    model = create_unet("seed", in_channels=1, features=4, depth=3, deep_supervision=2, class_head=3)
    variables = init_variables(model, jax.random.key(0), (2, 32, 32, 1))
    assert {"aux_head2", "aux_head3"} <= set(variables["params"])
    x = jnp.zeros((2, 32, 32, 1))
    out, _ = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    assert [a.shape for a in out["aux"]] == [(2, 16, 16, 1), (2, 8, 8, 1)]
    assert out["mask"].shape == (2, 32, 32, 1) and out["class"].shape == (2, 3)
    (mask, cls), _ = run_model(model.apply, variables, x)
    assert mask.shape == (2, 32, 32, 1) and cls.shape == (2, 3)
    plain = create_unet("seed", in_channels=1, features=4, depth=3, class_head=3)
    np.testing.assert_array_equal(
        np.asarray(
            run_model(
                plain.apply,
                {**variables, "params": {k: v for k, v in variables["params"].items() if not k.startswith("aux_head")}},
                x,
            )[0][0]
        ),
        np.asarray(mask),
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"depth": 2, "deep_supervision": 2}, "from 0 to depth - 1 = 1"),
        ({"deep_supervision": 1, "padding": "VALID"}, "VALID"),
    ],
)
def test_deep_supervision_fields_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        create_unet("seed", in_channels=1, **fields)


def test_deep_supervision_changes_the_gradient_of_the_coarse_decoder():
    """The aux head's loss reaches the decoder level it reads: a step with deep supervision
    moves dec2 differently from the same step without it (same weights, same batch)."""
    base = _state(0.0, deep_supervision=1)
    with_aux, _ = train_step(base, _batch(), jax.random.key(1), loss_fn=BCE)
    plain_model = create_unet("seed", in_channels=1, features=4, depth=2)
    plain = base.replace(apply_fn=plain_model.apply)
    without, _ = train_step(plain, _batch(), jax.random.key(1), loss_fn=BCE)
    a = np.asarray(with_aux.params["dec2"]["conv1"]["kernel"])
    b = np.asarray(without.params["dec2"]["conv1"]["kernel"])
    assert not np.allclose(a, b)
    # and the aux head itself learns only with deep supervision
    assert not np.allclose(with_aux.params["aux_head2"]["kernel"], base.params["aux_head2"]["kernel"])
    np.testing.assert_array_equal(without.params["aux_head2"]["kernel"], base.params["aux_head2"]["kernel"])
