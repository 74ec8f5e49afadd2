"""The inference recipe (unet_jax.inference): morphology against SciPy, recipe application,
tuning on validation predictions, and the recipe travelling with checkpoints and exports."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_jax.inference import (
    RAW,
    InferenceRecipe,
    connected_components,
    fill_holes,
    gate_score,
    recipe_mask,
    refine_probabilities,
    select_components,
    tune_recipe,
)

masks = st.integers(0, 2**31 - 1).map(
    lambda seed: np.random.default_rng(seed).random((np.random.default_rng(seed).integers(1, 24),
                                                     np.random.default_rng(seed + 1).integers(1, 24))) < 0.45)


@settings(max_examples=60, deadline=None)
@given(masks)
def test_connected_components_match_scipy_8_connectivity(mask):
    labels, n = connected_components(mask)
    ref, n_ref = ndi.label(mask, structure=np.ones((3, 3)))
    assert n == n_ref
    # Same partition (scipy numbers components in raster order of their first pixel too).
    np.testing.assert_array_equal(labels, ref)


@settings(max_examples=60, deadline=None)
@given(masks)
def test_fill_holes_matches_scipy(mask):
    # Foreground 8-connected, so background (holes) is 4-connected: scipy's default structure.
    np.testing.assert_array_equal(fill_holes(mask), ndi.binary_fill_holes(mask))


def test_closed_form_components_and_holes():
    mask = np.zeros((9, 9), bool)
    mask[1:6, 1:6] = True  # a 5x5 ring with a 3x3 hole -> 16 pixels, hole of 9
    mask[2:5, 2:5] = False
    mask[7, 7] = True  # a lone pixel
    mask[8, 8] = True  # diagonal neighbour: same component under 8-connectivity
    labels, n = connected_components(mask)
    assert n == 2 and (labels == 1).sum() == 16 and (labels == 2).sum() == 2
    assert fill_holes(mask).sum() == 16 + 9 + 2
    largest = select_components(mask, InferenceRecipe(components="largest"))
    assert largest.sum() == 16 and not largest[7, 7]
    floor = select_components(mask, InferenceRecipe(min_component_fraction=3 / 81))
    np.testing.assert_array_equal(floor, largest)
    assert select_components(mask, RAW) is not None and select_components(mask, RAW).sum() == 18


def test_refine_keeps_the_kept_lesions_edge_and_fills_holes():
    prob = np.zeros((12, 12), np.float32)
    prob[2:8, 2:8] = 0.9
    prob[4:6, 4:6] = 0.1  # a hole
    prob[1, 2:8] = 0.3  # sub-threshold rim next to the lesion: kept for bilinear resizing
    prob[10, 10] = 0.8  # a small distant blob
    out = refine_probabilities(prob, InferenceRecipe(components="largest", fill_holes=True))
    assert out[10, 10] == 0.0  # dropped
    assert np.all(out[1, 2:8] == np.float32(0.3))  # one-pixel ring kept as it was
    assert np.all(out[4:6, 4:6] == 1.0)  # hole filled
    assert np.array_equal(out[2:4, 2:8], prob[2:4, 2:8])


def test_recipe_mask_gates_and_resizes():
    prob = np.full((8, 8), 0.2, np.float32)
    prob[2:6, 2:6] = 0.7
    normal_class = np.array([0.1, 0.1, 0.8])
    lesion_class = np.array([0.6, 0.3, 0.1])
    full = recipe_mask(prob, None, RAW, (16, 16))
    assert full.shape == (16, 16) and 40 <= full.sum() <= 90  # the 4x4 block at double size
    gate = InferenceRecipe(gate="class", gate_threshold=0.5)
    assert not recipe_mask(prob, normal_class, gate, (16, 16)).any()
    np.testing.assert_array_equal(recipe_mask(prob, lesion_class, gate, (16, 16)), full)
    assert not recipe_mask(prob, None, InferenceRecipe(gate="max_prob", gate_threshold=0.75), (16, 16)).any()
    assert recipe_mask(prob, None, InferenceRecipe(gate="max_prob", gate_threshold=0.65), (16, 16)).any()
    assert not recipe_mask(prob, None, InferenceRecipe(gate="area", gate_threshold=0.3), (16, 16)).any()  # 25% area
    assert recipe_mask(prob, None, InferenceRecipe(gate="area", gate_threshold=0.2), (16, 16)).any()
    with pytest.raises(ValueError, match="class head"):
        gate_score("class", prob, None, 0.5)


def test_recipe_validation_and_round_trip():
    recipe = InferenceRecipe(threshold=0.4, flip_tta=True, gate="area", gate_threshold=0.01, components="largest",
                             fill_holes=True, tuned_on="val")
    assert InferenceRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert "gate area 0.01" in recipe.describe() and "flip TTA" in recipe.describe()
    for bad in ({"threshold": 1.0}, {"gate": "magic"}, {"components": "some"}, {"min_component_fraction": 1.0},
                {"flip_tta": "yes"}, {"gate_threshold": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            InferenceRecipe(**bad)
    with pytest.raises(ValueError, match="unknown key"):
        InferenceRecipe.from_dict({"thresold": 0.5})


def _synthetic_validation(seed: int = 0):
    """12 lesion images the model finds (plus a small false blob) and 6 normal images where
    it marks a faint blob: the class head knows which are normal."""
    rng = np.random.default_rng(seed)
    probs, gts, classes = [], [], []
    for i in range(18):
        lesion = i < 12
        p = rng.uniform(0, 0.2, (16, 16)).astype(np.float32)
        gt = np.zeros((32, 32), bool)
        if lesion:
            p[4:10, 4:10] = 0.95
            gt[8:20, 8:20] = True
            p[13:15, 13:15] = 0.9  # a false blob, smaller than the lesion
        else:
            p[6:9, 6:9] = 0.7
        probs.append(p)
        gts.append(gt)
        classes.append([0.7, 0.2, 0.1] if lesion else [0.1, 0.1, 0.8])
    return np.stack(probs), gts, np.asarray(classes)


def test_tuning_chooses_a_gate_and_the_largest_component_on_validation():
    probs, gts, classes = _synthetic_validation()
    recipe, report = tune_recipe(probs, probs, classes, gts)
    assert recipe.gate != "none" and recipe.components == "largest"
    assert report["chosen"]["normal_false_positive_rate"] == 0.0
    assert report["chosen"]["lesion_empty_rate"] == 0.0
    assert report["raw"]["normal_false_positive_rate"] == 1.0
    assert report["chosen"]["dice_all"] > report["raw"]["dice_all"]
    assert {"flip TTA", "largest component", "fill holes", "threshold 0.5"} <= set(report["levers"])
    assert any(k.startswith("gate class") for k in report["levers"])


def test_tuning_respects_the_lesion_empty_budget():
    probs, gts, _ = _synthetic_validation()
    probs[:6] *= 0.6  # six lesion images become faint: gating on max_prob would empty them
    strict, report = tune_recipe(probs, None, None, gts, max_lesion_empty=0.0)
    assert report["chosen"]["lesion_empty_rate"] == 0.0
    loose, report_loose = tune_recipe(probs, None, None, gts, max_lesion_empty=1.0)
    assert report_loose["chosen"]["dice_all"] >= report["chosen"]["dice_all"]
    assert not strict.flip_tta and not loose.flip_tta  # no flipped maps given: TTA not considered


def test_tuning_rejects_mismatched_inputs():
    probs, gts, _ = _synthetic_validation()
    with pytest.raises(ValueError, match="probability maps"):
        tune_recipe(probs[:3], None, None, gts)


# ---- the recipe with checkpoints, exports and the CLI -----------------------------------
@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    from _train_helpers import TINY

    from unet_jax.train import train

    run = tmp_path_factory.mktemp("tuned") / "run"
    train(dataclasses.replace(TINY, model={"features": 4, "depth": 2, "class_head": 3}, class_weight=0.2), run)
    return run


def test_training_tunes_saves_and_applies_the_recipe(tuned_run):
    from unet_jax.evaluate import load_checkpoint

    results = json.loads((tuned_run / "results.json").read_text())
    saved = json.loads((tuned_run / "inference.json").read_text())
    loaded = load_checkpoint(tuned_run)
    assert loaded.recipe == InferenceRecipe.from_dict(saved["recipe"])
    assert (loaded.step_dir / "inference.json").is_file()  # travels with the checkpoint
    assert results["inference"]["recipe"] == saved["recipe"]
    assert results["test"]["recipe"] == loaded.recipe.describe()
    assert "validation split" in loaded.recipe.tuned_on
    assert set(saved["validation"]["levers"]) >= {"flip TTA", "largest component"}


def test_export_round_trip_and_ensemble(tuned_run, tmp_path):
    from unet_jax.evaluate import load_checkpoint, predict_outputs
    from unet_jax.export import export_model, is_exported

    loaded = load_checkpoint(tuned_run)
    out = export_model([loaded], tmp_path / "exported")
    assert is_exported(out) and {p.name for p in out.iterdir()} == {"model.json", "member_0.msgpack"}
    again = load_checkpoint(out)
    assert again.recipe == loaded.recipe and again.config == loaded.config
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    p, c = predict_outputs(loaded, images)
    q, d = predict_outputs(again, images)
    np.testing.assert_allclose(q, p, atol=5e-3)  # float16 storage
    np.testing.assert_allclose(d, c, atol=5e-3)
    with pytest.raises(ValueError, match="exists"):
        export_model([loaded], out)
    (out / "stale.txt").write_text("from before")
    assert export_model([loaded], out, overwrite=True) == out and not (out / "stale.txt").exists()  # replaced whole
    # An ensemble of two copies predicts what one member does; of a model and a perturbed
    # copy, the mean of the two.
    shifted = dataclasses.replace(loaded, variables={**loaded.variables, "params": {
        **loaded.variables["params"], "head": {k: v + 0.5 for k, v in loaded.variables["params"]["head"].items()}}})
    ensemble = export_model([loaded, shifted], tmp_path / "ensemble", dtype="float32")
    both = load_checkpoint(ensemble)
    assert len(both.members) == 1
    r, _ = predict_outputs(both, images)
    s, _ = predict_outputs(shifted, images)
    np.testing.assert_allclose(r, 0.5 * (p + s), atol=1e-5)
    assert not list(tmp_path.glob(".*")) and {p.name for p in tmp_path.iterdir()} == {"exported", "ensemble"}


def test_export_refuses_mixed_architectures_and_damaged_members(tuned_run, tmp_path):
    from unet_jax.evaluate import load_checkpoint
    from unet_jax.export import export_model

    loaded = load_checkpoint(tuned_run)
    other = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, image_size=64))
    with pytest.raises(ValueError, match="one architecture"):
        export_model([loaded, other], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    out = export_model([loaded], tmp_path / "ok")
    (out / "member_0.msgpack").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="member_0.msgpack"):
        load_checkpoint(out)


def test_cli_raw_flag_and_export(tuned_run, tmp_path, capsys):
    from unet_jax.cli import main
    from unet_jax.data import write_phantom

    data = tmp_path / "data"
    write_phantom(data, counts={"benign": 2, "malignant": 1, "normal": 2}, size=(40, 48), seed=3)
    assert main(["evaluate", "--checkpoint", str(tuned_run), "--data", str(data), "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--checkpoint", str(tuned_run), "--data", str(data), "--json", "--raw"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert tuned["recipe"] == json.loads((tuned_run / "inference.json").read_text())["recipe"]
    assert raw["recipe"]["gate"] == "none" and raw["recipe"]["threshold"] == 0.5 and not raw["recipe"]["flip_tta"]
    assert main(["export", str(tuned_run), "--out", str(tmp_path / "m")]) == 0
    assert "1 member(s), float16" in capsys.readouterr().out
    assert main(["evaluate", "--checkpoint", str(tmp_path / "m"), "--data", str(data), "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["recipe"] == tuned["recipe"]
