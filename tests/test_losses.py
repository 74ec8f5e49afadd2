"""The losses, as tests.

Read top to bottom: BCE against the report's literal formula and against optax, its
stability and its positive weight; soft Dice at its extremes and on empty masks; the
combination and the registry; the confusion counts; jit and gradients throughout.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unet_jax.losses import (
    LOSSES,
    batch_confusion,
    bce_dice_loss,
    binary_cross_entropy,
    get_loss,
    soft_dice_loss,
)
from unet_jax.metrics import scores_from_confusion


def random_batch(seed: int, shape=(3, 8, 8, 1), scale: float = 3.0):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal(shape)).astype(np.float32)
    masks = (rng.random(shape) < 0.3).astype(np.float32)
    return logits, masks


def literal_bce(logits, masks, w=1.0):
    """The report's section 3.1.2: -(1/M) sum [w y log p + (1 - y) log(1 - p)], p = sigmoid(x)."""
    x = np.asarray(logits, np.float64)
    y = np.asarray(masks, np.float64)
    p = 1.0 / (1.0 + np.exp(-x))
    return -np.mean(w * y * np.log(p) + (1 - y) * np.log(1 - p))


# --------------------------------------------------------------------------------------
# 1. Binary cross-entropy
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(3, 8, 8, 1), (2, 5, 7)])
def test_bce_equals_the_reports_formula(seed, shape):
    logits, masks = random_batch(seed, shape)
    got = binary_cross_entropy(jnp.asarray(logits), jnp.asarray(masks))
    np.testing.assert_allclose(float(got), literal_bce(logits, masks), rtol=1e-5)


def test_bce_equals_optax():
    logits, masks = random_batch(3)
    expected = optax.sigmoid_binary_cross_entropy(jnp.asarray(logits), jnp.asarray(masks))
    got = binary_cross_entropy(jnp.asarray(logits), jnp.asarray(masks), reduction="none")
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_bce_reductions_agree():
    logits, masks = (jnp.asarray(a) for a in random_batch(4))
    per_pixel = binary_cross_entropy(logits, masks, reduction="none")
    assert per_pixel.shape == logits.shape
    per_image = binary_cross_entropy(logits, masks, reduction="per_image")
    assert per_image.shape == (3,)
    np.testing.assert_allclose(
        float(binary_cross_entropy(logits, masks, reduction="sum")), float(per_pixel.sum()), rtol=1e-6
    )
    # Equal-size images: the mean of per-image means is the mean over all pixels.
    np.testing.assert_allclose(float(per_image.mean()), float(binary_cross_entropy(logits, masks)), rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        binary_cross_entropy(logits, masks, reduction="avg")


@pytest.mark.parametrize(
    "x, y, expected",
    [
        (1e4, 1.0, 0.0),  # confidently right
        (-1e4, 0.0, 0.0),
        (1e4, 0.0, 1e4),  # confidently wrong: -log(1 - p) = softplus(x) ≈ x
        (-1e4, 1.0, 1e4),
        (0.0, 1.0, np.log(2.0)),
        (0.0, 0.0, np.log(2.0)),
    ],
)
def test_bce_is_exact_and_finite_at_extreme_logits(x, y, expected):
    logits = jnp.full((1, 2, 2, 1), x, jnp.float32)
    masks = jnp.full((1, 2, 2, 1), y, jnp.float32)
    loss, grad = jax.value_and_grad(binary_cross_entropy)(logits, masks)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_bce_gradient_is_sigmoid_minus_label_over_pixels():
    logits, masks = (jnp.asarray(a) for a in random_batch(5))
    grad = jax.grad(binary_cross_entropy)(logits, masks)
    expected = (jax.nn.sigmoid(logits) - masks) / logits.size
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=1e-5, atol=1e-8)


def test_pos_weight_scales_the_positive_term_only():
    logits, masks = random_batch(6)
    x, y = jnp.asarray(logits), jnp.asarray(masks)
    for w in (1.0, 2.5, 10.0):
        np.testing.assert_allclose(
            float(binary_cross_entropy(x, y, pos_weight=w)), literal_bce(logits, masks, w), rtol=1e-5
        )
    # On an all-background batch the weight changes nothing; on all-foreground it scales.
    zeros, ones = jnp.zeros_like(y), jnp.ones_like(y)
    np.testing.assert_allclose(
        float(binary_cross_entropy(x, zeros, pos_weight=5.0)), float(binary_cross_entropy(x, zeros)), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(binary_cross_entropy(x, ones, pos_weight=5.0)), 5.0 * float(binary_cross_entropy(x, ones)), rtol=1e-6
    )
    assert float(binary_cross_entropy(x, y, pos_weight=3.0)) > float(binary_cross_entropy(x, y))


def test_mismatched_shapes_are_refused_not_broadcast():
    logits = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="same shape"):
        binary_cross_entropy(logits, jnp.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="same shape"):
        soft_dice_loss(logits, jnp.zeros((2, 4, 4)))


# --------------------------------------------------------------------------------------
# 2. Soft Dice
# --------------------------------------------------------------------------------------
def confident(masks, margin: float = 50.0):
    """Logits that reproduce ``masks`` with probabilities 0 and 1 (to float32 precision)."""
    return jnp.where(jnp.asarray(masks) > 0.5, margin, -margin)


def square_masks(n=2, size=16):
    m = np.zeros((n, size, size, 1), np.float32)
    m[0, 2:8, 3:9] = 1
    m[1, 5:15, 5:15] = 1
    return jnp.asarray(m)


def test_dice_loss_is_zero_for_a_perfect_confident_prediction():
    masks = square_masks()
    assert float(soft_dice_loss(confident(masks), masks)) == pytest.approx(0.0, abs=1e-6)


def test_dice_loss_is_nearly_one_for_disjoint_masks():
    masks = square_masks()
    disjoint = 1.0 - masks  # predicts exactly the background
    loss = float(soft_dice_loss(confident(disjoint), masks))
    # 1 - s / (|P| + |Y| + s): with |P| + |Y| = H W = 256 and s = 1, 1 - 1/257.
    assert loss == pytest.approx(1.0 - 1.0 / 257.0, rel=1e-5)


def test_dice_loss_matches_the_formula_per_image_then_mean():
    logits, masks = random_batch(7)
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    per_image = [1 - (2 * (p[i] * masks[i]).sum() + 1) / (p[i].sum() + masks[i].sum() + 1) for i in range(len(p))]
    got = soft_dice_loss(jnp.asarray(logits), jnp.asarray(masks))
    np.testing.assert_allclose(float(got), np.mean(per_image), rtol=1e-5)
    batch = 1 - (2 * (p * masks).sum() + 1) / (p.sum() + masks.sum() + 1)
    got_batch = soft_dice_loss(jnp.asarray(logits), jnp.asarray(masks), per_image=False)
    np.testing.assert_allclose(float(got_batch), batch, rtol=1e-5)


def test_dice_loss_on_empty_masks():
    empty = jnp.zeros((1, 8, 8, 1))
    # Normal image predicted empty: (0 + s) / (0 + 0 + s) = 1, loss 0.
    assert float(soft_dice_loss(confident(empty), empty)) == pytest.approx(0.0, abs=1e-6)
    # Normal image with k predicted pixels: loss k / (k + s).
    pred = np.zeros((1, 8, 8, 1), np.float32)
    pred[0, :2, :2] = 1
    loss = float(soft_dice_loss(confident(pred), empty))
    assert loss == pytest.approx(4.0 / 5.0, rel=1e-5)
    # Lesion image predicted empty: 1 - s / (|Y| + s).
    assert float(soft_dice_loss(confident(empty), jnp.asarray(pred))) == pytest.approx(4.0 / 5.0, rel=1e-5)
    # Finite gradients even at the 0/0 point (smooth > 0).
    grad = jax.grad(soft_dice_loss)(jnp.zeros((1, 8, 8, 1)), empty)
    assert np.all(np.isfinite(np.asarray(grad)))


# --------------------------------------------------------------------------------------
# 3. Combination, registry
# --------------------------------------------------------------------------------------
def test_bce_dice_is_the_weighted_sum():
    logits, masks = (jnp.asarray(a) for a in random_batch(8))
    bce, dice = binary_cross_entropy(logits, masks), soft_dice_loss(logits, masks)
    np.testing.assert_allclose(float(bce_dice_loss(logits, masks)), float(bce + dice), rtol=1e-6)
    np.testing.assert_allclose(
        float(bce_dice_loss(logits, masks, bce_weight=0.5, dice_weight=2.0)), float(0.5 * bce + 2.0 * dice), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(bce_dice_loss(logits, masks, pos_weight=3.0)),
        float(binary_cross_entropy(logits, masks, pos_weight=3.0) + dice),
        rtol=1e-6,
    )


def test_get_loss_binds_options_and_names_the_known_losses():
    logits, masks = (jnp.asarray(a) for a in random_batch(9))
    loss = get_loss("bce_dice", dice_weight=0.0)
    np.testing.assert_allclose(float(loss(logits, masks)), float(binary_cross_entropy(logits, masks)), rtol=1e-6)
    assert set(LOSSES) == {"bce", "dice", "bce_dice"}
    with pytest.raises(ValueError, match=r"unknown loss 'focal'.*\['bce', 'bce_dice', 'dice'\]"):
        get_loss("focal")
    with pytest.raises(ValueError, match="unknown option"):
        get_loss("dice", pos_weight=2.0)
    with pytest.raises(ValueError, match="scalar"):
        get_loss("bce", reduction="none")


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_jits_and_has_finite_gradients(name):
    logits, masks = (jnp.asarray(a) for a in random_batch(10))
    loss = get_loss(name)
    value, grad = jax.jit(jax.value_and_grad(loss))(logits, masks)
    assert value.shape == () and value.dtype == jnp.float32
    np.testing.assert_allclose(float(value), float(loss(logits, masks)), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))
    # bf16 logits (mixed precision) are computed in float32.
    assert loss(logits.astype(jnp.bfloat16), masks).dtype == jnp.float32


# --------------------------------------------------------------------------------------
# 4. Confusion counts on device
# --------------------------------------------------------------------------------------
def test_batch_confusion_counts_and_scores():
    masks = square_masks()  # image 0: 36 px, image 1: 100 px, of 256
    pred = np.asarray(masks).copy()
    pred[0] = 0  # image 0: missed entirely
    pred[1, 5:15, 5:10] = 0  # image 1: the right half of its square only
    tp, fp, fn, tn = jax.jit(batch_confusion)(confident(pred), masks)
    for a in (tp, fp, fn, tn):
        assert a.shape == (2,) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(tp), [0, 50])
    np.testing.assert_array_equal(np.asarray(fp), [0, 0])
    np.testing.assert_array_equal(np.asarray(fn), [36, 50])
    np.testing.assert_array_equal(np.asarray(tn), [256 - 36, 256 - 100])
    scores = jax.jit(lambda *c: scores_from_confusion(*c))(tp, fp, fn, tn)
    np.testing.assert_allclose(np.asarray(scores["dice"]), [0.0, 100 / 150], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(scores["iou"]), [0.0, 0.5], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(scores["pixel_accuracy"]), [220 / 256, 206 / 256], rtol=1e-6)


def test_batch_confusion_threshold_is_on_probabilities():
    logits = jnp.asarray([[-1.0, 0.0, 0.5, 2.0]])  # p = .27, .5, .62, .88
    masks = jnp.ones_like(logits)
    tp = batch_confusion(logits, masks)[0]
    assert float(tp[0]) == 2  # p > 0.5 strictly: the logit 0 (p = 0.5) is negative
    assert float(batch_confusion(logits, masks, threshold=0.8)[0][0]) == 1


def test_get_loss_gives_one_object_per_loss_and_options_so_steps_do_not_recompile():
    from unet_jax.losses import get_loss

    assert get_loss("bce_dice") is get_loss("bce_dice")
    assert get_loss("bce", pos_weight=2.0) is get_loss("bce", pos_weight=2.0)
    assert get_loss("bce", pos_weight=2.0) is not get_loss("bce", pos_weight=3.0)
    traces = []
    f = jax.jit(lambda x, loss: (traces.append(1), loss(x, x))[1], static_argnums=1)
    x = jnp.zeros((1, 4, 4, 1))
    for _ in range(3):
        f(x, get_loss("bce_dice"))
    assert len(traces) == 1
