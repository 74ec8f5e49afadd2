"""The other rows of the report's table through the same pipeline: the model registry,
classification (a ResNet classifier, a class head on the U-Net's bottleneck), frozen
parameter groups, starting from existing parameters, box prompts."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _train_helpers import TINY
from hypothesis import given
from hypothesis import strategies as st
from test_train import random_device_data

from unet_jax.config import TrainConfig, config_from_dict, config_to_dict
from unet_jax.data import make_sampler
from unet_jax.data.prompts import boxes_from_masks
from unet_jax.losses import get_loss, softmax_cross_entropy
from unet_jax.metrics import classification_metrics, roc_auc
from unet_jax.models import apply_overrides, create_model, model_family, model_names, needs_box_prompts
from unet_jax.train import train
from unet_jax.train.init_from import overlay_variables
from unet_jax.train.state import create_train_state, make_optimizer
from unet_jax.train.steps import train_step

TINY_LOSS = get_loss("bce_dice")


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------
def test_every_family_is_reachable_by_name():
    names = model_names()
    assert {"seed", "padded", "ronneberger"} <= set(names["unet"])
    assert {"resnet18_unet", "resnet34_unet", "resnet18_classifier", "resnet34_classifier"} <= set(names["resnet"])
    assert {"sam_vit_b", "sam_vit_l", "sam_vit_h"} <= set(names["sam"])
    assert model_family("resnet34_unet") == "resnet" and model_family("padded") == "unet"
    assert needs_box_prompts(create_model("sam_vit_b")) and not needs_box_prompts(create_model("seed"))
    with pytest.raises(ValueError, match="unknown model preset 'resnet50'.*resnet34_unet"):
        create_model("resnet50")


def test_model_overrides_follow_the_preset_named_in_the_same_list():
    config = apply_overrides(TrainConfig(), ["preset=resnet34_unet", "model.decoder_channels=(128,64,32,16,8)"])
    assert config.preset == "resnet34_unet" and config.model == {"decoder_channels": (128, 64, 32, 16, 8)}
    with pytest.raises(ValueError, match="unknown model field 'features' of preset 'resnet34_unet'"):
        apply_overrides(TrainConfig(), ["preset=resnet34_unet", "model.features=8"])


def test_freeze_override_and_json_round_trip():
    config = apply_overrides(TrainConfig(), ["freeze=image_encoder,prompt_encoder", "monitor=val/accuracy"])
    assert config.freeze == ("image_encoder", "prompt_encoder")
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert again == config


# --------------------------------------------------------------------------------------
# Losses and metrics of classification
# --------------------------------------------------------------------------------------
def test_softmax_cross_entropy_is_minus_log_softmax_of_the_label():
    logits = jnp.asarray([[2.0, 0.0, -1.0], [1000.0, 0.0, 0.0]])
    labels = jnp.asarray([1, 0])
    expected = [-(0.0 - np.log(np.exp(2.0) + 1.0 + np.exp(-1.0))), 0.0]
    np.testing.assert_allclose(np.asarray(softmax_cross_entropy(logits, labels)), expected, rtol=1e-6, atol=1e-6)


@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=30))
def test_roc_auc_equals_the_fraction_of_correctly_ordered_pairs(pairs):
    scores = np.asarray([s for s, _ in pairs], float)
    positive = np.asarray([p for _, p in pairs])
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        assert np.isnan(roc_auc(scores, positive))
        return
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, positive) == pytest.approx(brute)


def test_classification_metrics_closed_form():
    labels = np.asarray([0, 0, 1, 1, 2, 2])
    probs = np.asarray(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]]
    )
    m = classification_metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["per_class_recall"] == pytest.approx({"benign": 0.5, "malignant": 1.0, "normal": 0.5})
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["loss"] == pytest.approx(-np.mean(np.log([0.8, 0.2, 0.8, 0.6, 0.8, 0.2])))
    # malignant scores: positives .8 .6 against negatives .1 .7 .1 .2 -> 7 of 8 pairs ordered
    assert m["malignant_vs_rest_auc"] == pytest.approx(7 / 8)
    # A class with no image has no recall (NaN, not 0); tiny probabilities are not clipped away.
    m = classification_metrics(np.asarray([0, 1]), np.asarray([[0.9, 0.05, 0.05], [0.5, 1e-9, 0.5 - 1e-9]]))
    assert np.isnan(m["per_class_recall"]["normal"])
    assert m["loss"] == pytest.approx(np.mean([-np.log(0.9), -np.log(1e-9)]))


# --------------------------------------------------------------------------------------
# Box prompts
# --------------------------------------------------------------------------------------
def test_boxes_are_the_tight_extent_and_the_whole_image_when_empty():
    masks = np.zeros((2, 10, 12, 1), np.float32)
    masks[0, 2:5, 3:9] = 1
    boxes = np.asarray(boxes_from_masks(jnp.asarray(masks)))
    np.testing.assert_array_equal(boxes, [[3, 2, 8, 4], [0, 0, 11, 9]])


def test_jittered_boxes_stay_inside_the_image_and_are_reproducible():
    masks = np.zeros((64, 20, 20, 1), np.float32)
    masks[:, 5:15, 6:12] = 1
    a = np.asarray(boxes_from_masks(jnp.asarray(masks), jitter=0.2, key=jax.random.key(0)))
    b = np.asarray(boxes_from_masks(jnp.asarray(masks), jitter=0.2, key=jax.random.key(0)))
    np.testing.assert_array_equal(a, b)
    assert (a >= 0).all() and (a <= 19).all()
    assert (a[:, 2] >= a[:, 0]).all() and (a[:, 3] >= a[:, 1]).all()
    assert np.abs(a - [6, 5, 11, 14]).max() <= 0.2 * 20 + 1e-5 and a.std(axis=0).min() > 0


def test_jitter_is_two_sided_scaled_by_the_longer_side_and_clipped_per_axis():
    corner = np.zeros((512, 20, 40, 1), np.float32)
    corner[:, 0:3, 35:40] = 1  # x 35..39, y 0..2 of a 20 x 40 image
    a = np.asarray(boxes_from_masks(jnp.asarray(corner), jitter=0.25, key=jax.random.key(0)))
    assert a[:, [0, 2]].max() == 39 and a[:, [1, 3]].min() == 0  # both clips hit; x stops at W - 1
    assert a[:, [1, 3]].max() <= 19
    centred = np.zeros((512, 20, 40, 1), np.float32)
    centred[:, 8:12, 10:30] = 1
    d = np.asarray(boxes_from_masks(jnp.asarray(centred), jitter=0.1, key=jax.random.key(1))) - [10, 8, 29, 11]
    assert (d < -1).any() and (d > 1).any()  # both directions
    assert np.abs(d).max() > 0.1 * 20 + 0.5  # up to 0.1 x max(H, W) = 4 pixels, not 0.1 x min(H, W)


def test_boxes_reach_the_model_jittered_in_training_only():
    """apply_model gives a box-prompted model the masks' tight boxes at evaluation (even
    with a key) and jittered ones in training."""
    from types import SimpleNamespace

    from unet_jax.train.steps import apply_model

    seen = []

    def apply_fn(variables, images, boxes, *, train, **kwargs):
        seen.append(np.asarray(boxes))
        out = jnp.zeros(images.shape[:3] + (1,))
        return (out, {}) if train else out

    state = SimpleNamespace(box_prompts=True, batch_stats={}, apply_fn=apply_fn)
    masks = np.zeros((4, 16, 16, 1), np.float32)
    masks[:, 4:9, 3:12] = 1
    tight = np.asarray(boxes_from_masks(jnp.asarray(masks)))
    apply_model(
        state, {}, jnp.zeros((4, 16, 16, 1)), jnp.asarray(masks), train=False, key=jax.random.key(0), box_jitter=0.1
    )
    apply_model(
        state, {}, jnp.zeros((4, 16, 16, 1)), jnp.asarray(masks), train=True, key=jax.random.key(0), box_jitter=0.1
    )
    np.testing.assert_array_equal(seen[0], tight)
    assert not np.array_equal(seen[1], tight)


# --------------------------------------------------------------------------------------
# Training other heads, frozen groups, initial parameters
# --------------------------------------------------------------------------------------
def _labelled(n: int = 16, size: int = 32):
    data = random_device_data(n, size)
    return dataclasses.replace(data, labels=jnp.asarray(np.arange(n) % 3, jnp.int32))


def test_a_classifier_step_lowers_its_cross_entropy():
    model = create_model("resnet18_classifier", in_channels=1)
    state = create_train_state(model, optax.adam(1e-3), jax.random.key(0, impl="rbg"), (1, 32, 32, 1))
    batch = make_sampler(16, 16, None)(_labelled(), jax.random.key(1), 0)
    step = jax.jit(lambda s, b: train_step(s, b, jax.random.key(2), loss_fn=None))
    losses = []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"][0] / metrics["loss"][1]))
        assert set(metrics) == {"loss", "accuracy", "class_loss"}  # no Dice for a classifier
    assert losses[-1] < losses[0]


def test_frozen_groups_do_not_move_even_with_weight_decay():
    config = dataclasses.replace(
        TINY,
        model={"features": 4, "depth": 1, "class_head": 3},
        optimizer="adamw",
        weight_decay=0.5,
        freeze=("enc1", "class_head"),
        class_weight=1.0,
    )
    model = create_model("seed", in_channels=1, **config.model)
    state = create_train_state(
        model, make_optimizer(config, 5), jax.random.key(0, impl="rbg"), (1, 16, 16, 1), frozen=config.freeze
    )
    batch = make_sampler(8, 16, None)(_labelled(16, 16), jax.random.key(1), 0)
    before = jax.device_get(state.params)
    step = jax.jit(lambda s, b: train_step(s, b, jax.random.key(2), loss_fn=TINY_LOSS, class_weight=1.0))
    after, _ = step(state, batch)
    after = jax.device_get(after.params)
    for group in before:
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[group]), jax.tree.leaves(after[group])))
        assert same == (group in config.freeze), group
    with pytest.raises(ValueError, match=r"freeze \['encoder'\]: no such parameter group.*enc1"):
        create_train_state(model, optax.sgd(0.1), jax.random.key(0, impl="rbg"), (1, 16, 16, 1), frozen=("encoder",))


def _headed_state(frozen=()):
    model = create_model("seed", in_channels=1, features=4, depth=1, class_head=3)
    # Plain SGD: no optimiser mask, so only the step itself can keep a frozen group fixed.
    state = create_train_state(model, optax.sgd(0.1), jax.random.key(0, impl="rbg"), (1, 16, 16, 1), frozen=frozen)
    return state, make_sampler(8, 16, None)(_labelled(16, 16), jax.random.key(1), 0)


def test_class_weight_scales_the_cross_entropy_in_the_loss():
    state, batch = _headed_state()
    mean = lambda m, k: float(m[k][0] / m[k][1])  # noqa: E731
    step = lambda w: jax.jit(  # noqa: E731
        lambda s, b: train_step(s, b, jax.random.key(2), loss_fn=TINY_LOSS, class_weight=w)[1]
    )
    m = {w: jax.device_get(step(w)(state, batch)) for w in (0.0, 0.5)}
    assert mean(m[0.5], "loss") - mean(m[0.0], "loss") == pytest.approx(0.5 * mean(m[0.5], "class_loss"), rel=1e-4)


def test_frozen_groups_get_no_gradient_even_without_an_optimiser_mask():
    state, batch = _headed_state(frozen=("enc1",))
    step = jax.jit(lambda s, b: train_step(s, b, jax.random.key(2), loss_fn=TINY_LOSS, class_weight=1.0))
    after, _ = step(state, batch)
    for a, b in zip(jax.tree.leaves(state.params["enc1"]), jax.tree.leaves(after.params["enc1"])):
        np.testing.assert_array_equal(a, b)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(state.params["class_head"]), jax.tree.leaves(after.params["class_head"]))
    ]
    assert all(moved)


def test_overlay_grafts_a_subtree_and_names_a_wrong_shape():
    target = {
        "params": {"encoder": {"conv1": {"kernel": np.zeros((3, 3, 1, 4))}}, "head": {"bias": np.zeros(1)}},
        "batch_stats": {},
    }
    source = {"params": {"conv1": {"kernel": np.ones((3, 3, 1, 4))}}}
    merged, copied = overlay_variables(target, source, "x.msgpack")
    assert copied == 1 and merged["params"]["encoder"]["conv1"]["kernel"].sum() == 36
    assert target["params"]["encoder"]["conv1"]["kernel"].sum() == 0  # the target is not modified
    with pytest.raises(ValueError, match=r"x.msgpack.*encoder/conv1/kernel has shape \(3, 3, 1, 8\).*\(3, 3, 1, 4\)"):
        overlay_variables(target, {"params": {"conv1": {"kernel": np.ones((3, 3, 1, 8))}}}, "x.msgpack")
    with pytest.raises(ValueError, match="match no part of the model"):
        overlay_variables(target, {"params": {"fc": {"kernel": np.ones(2)}}}, "x.msgpack")
    # The target's dtype is kept; a leaf or a subtree the model lacks is named.
    merged, _ = overlay_variables(target, {"params": {"conv1": {"kernel": np.ones((3, 3, 1, 4), np.float64)}}}, "x")
    assert merged["params"]["encoder"]["conv1"]["kernel"].dtype == target["params"]["encoder"]["conv1"]["kernel"].dtype
    with pytest.raises(ValueError, match="encoder/conv1/bias has no counterpart"):
        overlay_variables(target, {"params": {"conv1": {"kernel": np.ones((3, 3, 1, 4)), "bias": np.ones(4)}}}, "x")
    with pytest.raises(ValueError, match="encoder/conv1/sub/w has no counterpart"):
        overlay_variables(target, {"params": {"conv1": {"sub": {"w": np.ones(1)}}}}, "x")


def test_a_classifier_runs_end_to_end(tmp_path, monkeypatch, capsys):
    """Train, then `unet-jax evaluate` (given a relative path, which Orbax alone refuses).
    (A U-Net with a class head runs end to end in tests/test_compare.py.)"""
    # A narrow ResNet-18: the full width's 11 M parameters would only slow the test.
    classifier = dataclasses.replace(
        TINY, preset="resnet18_classifier", model={"widths": (8, 16, 32, 64)}, epochs=1, monitor="val/accuracy"
    )
    train(classifier, tmp_path / "classifier")
    results = json.loads((tmp_path / "classifier" / "results.json").read_text())
    assert "test" not in results  # no mask head: no segmentation rows
    c = results["test_classification"]
    assert set(c) >= {"accuracy", "loss", "per_class_recall", "malignant_vs_rest_auc", "confusion_matrix"}
    assert sum(map(sum, c["confusion_matrix"])) == c["n"] > 0
    from unet_jax.inference import load

    saved = load(tmp_path / "classifier").variables["params"]
    assert results["parameters"]["trainable"] == sum(np.size(x) for x in jax.tree.leaves(saved))

    from unet_jax.cli import main

    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", "classifier", "--data", "classifier/phantom", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "dice" not in report and report["classification"]["n"] == TINY.phantom_images
    assert 0 <= report["classification"]["accuracy"] <= 1


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(preset="resnet18_classifier", model={}, monitor="val/dice"), "a classifier.*expected monitor"),
        (dict(monitor="val/accuracy"), "no class head"),
        (dict(model={"features": 4, "depth": 2, "class_head": 3}), "class_weight = 0"),
    ],
)
def test_heads_and_config_must_agree(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        train(dataclasses.replace(TINY, **changes), tmp_path / "run")
    assert not (tmp_path / "run" / "split.json").exists()  # refused before any work


def test_init_from_a_run_with_zero_epochs_evaluates_its_parameters(trained_run, tmp_path):
    """epochs = 0 with init_from: the parameters evaluated as they are (how SAM is used as
    released); here from a finished run, whose test scores it must reproduce."""
    from unet_jax.inference import load

    run_dir, _, _ = trained_run
    events = []
    config = dataclasses.replace(TINY, init_from=str(run_dir), epochs=0)
    train(config, tmp_path / "again", progress=events.append)
    (copied,) = [e["parameters_copied"] for e in events if e["kind"] == "init_from"]
    start, now = load(run_dir).variables, load(tmp_path / "again").variables
    assert copied == len(jax.tree.leaves(start))
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(now)):
        np.testing.assert_array_equal(a, b)
    before = json.loads((run_dir / "results.json").read_text())
    after = json.loads((tmp_path / "again" / "results.json").read_text())
    assert after["epochs_run"] == 0 and after["best_epoch"] is None
    assert after["test"]["dice"]["mean"] == pytest.approx(before["test"]["dice"]["mean"], abs=1e-6)
    with pytest.raises(ValueError, match="epochs = 0 evaluates the parameters of init_from"):
        dataclasses.replace(config, init_from=None)


def test_sam_fine_tuned_from_an_official_format_checkpoint(tmp_path):
    """Box-prompted SAM (the reduced preset) through the same loop, starting from a state
    dict torch.save wrote in the official layout: every parameter taken from the file,
    the mask decoder fine-tuned, the image and prompt encoders frozen; lesion images only,
    boxes from the masks."""
    import torch
    from test_sam import randomised_torch_sam, torch_state_numpy

    from unet_jax.cli import main
    from unet_jax.convert.sam import sam_params_from_state_dict
    from unet_jax.inference import load
    from unet_jax.models.sam import SAM_PRESETS

    torch_model = randomised_torch_sam(SAM_PRESETS["sam_tiny"], seed=5)
    torch.save(torch_model.state_dict(), tmp_path / "sam_tiny.pth")
    released = sam_params_from_state_dict(torch_state_numpy(torch_model), "sam_tiny")
    config = dataclasses.replace(
        TINY,
        preset="sam_tiny",
        model={},
        epochs=1,
        init_from=str(tmp_path / "sam_tiny.pth"),
        freeze=("image_encoder", "prompt_encoder"),
        learning_rate=1e-3,
        monitor="val/dice",
    )
    events = []
    train(config, tmp_path / "tuned", progress=events.append)
    (copied,) = [e["parameters_copied"] for e in events if e["kind"] == "init_from"]
    assert copied == len(jax.tree.leaves(released))  # the whole file, nothing left at its initial value

    end = load(tmp_path / "tuned").variables["params"]
    assert jax.tree.structure(end) == jax.tree.structure(released)
    for group in ("image_encoder", "prompt_encoder", "mask_decoder"):
        same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(released[group]), jax.tree.leaves(end[group])))
        assert same == (group != "mask_decoder"), group

    results = json.loads((tmp_path / "tuned" / "results.json").read_text())
    assert results["prompted"].startswith("boxes from the ground-truth masks")
    assert results["parameters"]["frozen"] > 0 and results["test"]["images"]["normal"] == 0
    counts = json.loads((tmp_path / "tuned" / "split.json").read_text())["counts"]
    assert all(c.get("normal", 0) == 0 and sum(c.values()) > 0 for c in counts.values())  # no box for a normal image

    assert main(["predict", "--checkpoint", str(tmp_path / "tuned"), "any.png", "--out", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()  # refused before writing anything


def test_convert_a_torchvision_resnet_and_start_a_resnet_unet_from_it(tmp_path, capsys):
    """`unet-jax convert` on a file torch.save wrote, then init_from: the U-Net's encoder
    holds the torchvision weights (the RGB stem summed for a grayscale input)."""
    import torch
    from test_resnet import R18, TorchResNet, randomised

    from unet_jax.cli import main
    from unet_jax.models import build_model, init_variables
    from unet_jax.train.init_from import read_source_variables

    torch_model = randomised(TorchResNet(R18, num_classes=1000), seed=3)
    torch.save(torch_model.state_dict(), tmp_path / "resnet18.pth")
    assert (
        main(
            [
                "convert",
                str(tmp_path / "resnet18.pth"),
                "--preset",
                "resnet18_unet",
                "--channels",
                "1",
                "--out",
                str(tmp_path / "resnet18.msgpack"),
            ]
        )
        == 0
    )
    assert "resnet18_unet" in capsys.readouterr().out

    config = dataclasses.replace(TINY, preset="resnet18_unet", model={}, init_from=str(tmp_path / "resnet18.msgpack"))
    fresh = init_variables(build_model(config), jax.random.key(0), (1, 32, 32, 1))
    merged, copied = overlay_variables(jax.device_get(fresh), read_source_variables(config, config.init_from), "x")
    stem = torch_model.conv1.weight.detach().numpy().sum(axis=1, keepdims=True).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(merged["params"]["encoder"]["conv1"]["kernel"], stem, rtol=1e-6)
    mean = torch_model.bn1.running_mean.numpy()
    np.testing.assert_array_equal(merged["batch_stats"]["encoder"]["bn1"]["mean"], mean)
    assert copied == 20 + 20 * 4  # 20 convolution kernels, 20 batch norms x (scale, bias, mean, var)
    # The decoder is not in the file: it keeps its initial values.
    decoder = [k for k in merged["params"] if k.startswith("decoder")]
    assert decoder and all(
        np.array_equal(a, b)
        for k in decoder
        for a, b in zip(jax.tree.leaves(merged["params"][k]), jax.tree.leaves(fresh["params"][k]))
    )


def test_convert_refuses_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    from unet_jax.cli import main

    bad = tmp_path / "sam_vit_b_01ec64.pth"
    bad.write_text("version https://git-lfs.github.com/spec/v1\n")
    assert main(["convert", str(bad), "--out", str(tmp_path / "sam.msgpack")]) == 2
    err = capsys.readouterr().err
    assert "sam_vit_b_01ec64.pth" in err and not (tmp_path / "sam.msgpack").exists()
    assert not list(tmp_path.glob(".sam.msgpack*"))  # nothing half-written
