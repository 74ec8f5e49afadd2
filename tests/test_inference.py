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

from unet_jax import metrics as M
from unet_jax.inference import (
    RAW,
    InferenceRecipe,
    LearnedGate,
    choose_recipe,
    connected_components,
    fill_holes,
    fit_learned_gate,
    gate_features,
    gate_score,
    recipe_mask,
    recipe_outcome,
    refine_probabilities,
    score_recipes,
    select_components,
    tune_recipe,
)

masks = st.integers(0, 2**31 - 1).map(
    lambda seed: (
        np.random.default_rng(seed).random(
            (np.random.default_rng(seed).integers(1, 24), np.random.default_rng(seed + 1).integers(1, 24))
        )
        < 0.45
    )
)


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


def _serpentine(side: int) -> np.ndarray:
    """One 8-connected path of ~side^2/2 pixels: full even rows joined at alternating ends."""
    path = np.zeros((side, side), bool)
    path[::2] = True
    path[1::4, -1] = True
    path[3::4, 0] = True
    return path


def test_components_and_holes_take_linear_time_on_a_long_path():
    # A 200x200 path of 20,000 pixels: label propagation needs a pass per pixel of its
    # length (~10 s); scipy's labelling is one sweep (~1 ms). Generous bound for a busy machine.
    import time

    path = _serpentine(200)
    corridor = np.zeros((202, 202), bool)  # the path as background, open to the border at one pixel
    corridor[1:-1, 1:-1] = _serpentine(200)
    corridor[1, 0] = True
    start = time.perf_counter()
    labels, n = connected_components(path)
    filled = fill_holes(~corridor)
    elapsed = time.perf_counter() - start
    assert n == 1 and (labels == 1).sum() == path.sum()
    assert not filled[corridor].any()  # the corridor reaches the border: not a hole
    assert elapsed < 1.0, f"{elapsed:.2f} s for 200x200"


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
    recipe = InferenceRecipe(
        threshold=0.4,
        flip_tta=True,
        gate="area",
        gate_threshold=0.01,
        components="largest",
        fill_holes=True,
        tuned_on="val",
    )
    assert InferenceRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert "gate area 0.01" in recipe.describe() and "flip TTA" in recipe.describe()
    for bad in (
        {"threshold": 1.0},
        {"gate": "magic"},
        {"components": "some"},
        {"min_component_fraction": 1.0},
        {"flip_tta": "yes"},
        {"gate_threshold": -0.1},
    ):
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
    # every rate with its count and Wilson interval (the ablation and oof tables show them)
    normals = int(sum(not g.any() for g in gts))
    fp = report["chosen"]["normal_false_positive"]
    assert (fp["count"], fp["n"]) == (0, normals)
    assert (fp["ci_low"], fp["ci_high"]) == pytest.approx(M.wilson_ci(0, normals)) and fp["ci_high"] > 0
    raw = report["raw"]["normal_false_positive"]
    assert (raw["count"], raw["ci_high"]) == (normals, 1.0) and raw["ci_low"] < 1.0
    assert (
        M.rate_cell(report["chosen"]["lesion_empty"], 0.0)
        == f"0.000 [0.000, {report['chosen']['lesion_empty']['ci_high']:.3f}]"
    )
    assert M.rate_cell(None, 0.25) == "0.250"  # a stored report from before the counts were kept


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
    from unet_jax.inference import load

    results = json.loads((tuned_run / "results.json").read_text())
    saved = json.loads((tuned_run / "inference.json").read_text())
    loaded = load(tuned_run)
    assert loaded.recipe == InferenceRecipe.from_dict(saved["recipe"])
    assert (loaded.step_dir / "inference.json").is_file()  # travels with the checkpoint
    assert results["inference"]["recipe"] == saved["recipe"]
    assert results["test"]["recipe"] == loaded.recipe.describe()
    assert "validation split" in loaded.recipe.tuned_on
    assert set(saved["validation"]["levers"]) >= {"flip TTA", "largest component"}


def test_export_round_trip_and_ensemble(tuned_run, tmp_path):
    from unet_jax.inference import export_model, is_exported, load, predict_outputs

    loaded = load(tuned_run)
    out = export_model([loaded], tmp_path / "exported")
    assert is_exported(out) and {p.name for p in out.iterdir()} == {"model.json", "member_0.msgpack"}
    again = load(out)
    assert again.recipe == loaded.recipe and again.config == loaded.config
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    p, c = predict_outputs(loaded, images)
    q, d = predict_outputs(again, images)
    np.testing.assert_allclose(q, p, atol=5e-3)  # float16 storage
    np.testing.assert_allclose(d, c, atol=5e-3)
    with pytest.raises(ValueError, match="exists"):
        export_model([loaded], out)
    (out / "stale.txt").write_text("from before")  # not the export's: refused, kept
    with pytest.raises(ValueError, match=r"it holds 'stale.txt', not part of a model folder"):
        export_model([loaded], out, overwrite=True)
    (out / "stale.txt").unlink()
    assert export_model([loaded], out, overwrite=True) == out
    # An ensemble of two copies predicts what one member does; of a model and a perturbed
    # copy, the mean of the two.
    shifted = dataclasses.replace(
        loaded,
        variables={
            **loaded.variables,
            "params": {
                **loaded.variables["params"],
                "head": {k: v + 0.5 for k, v in loaded.variables["params"]["head"].items()},
            },
        },
    )
    ensemble = export_model([loaded, shifted], tmp_path / "ensemble", dtype="float32")
    both = load(ensemble)
    assert len(both.members) == 1
    r, _ = predict_outputs(both, images)
    s, _ = predict_outputs(shifted, images)
    np.testing.assert_allclose(r, 0.5 * (p + s), atol=1e-5)
    assert not list(tmp_path.glob(".*")) and {p.name for p in tmp_path.iterdir()} == {"exported", "ensemble"}


def test_export_refuses_mixed_architectures_and_damaged_members(tuned_run, tmp_path):
    from unet_jax.inference import export_model, load

    loaded = load(tuned_run)
    other = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, image_size=64))
    with pytest.raises(ValueError, match="one architecture"):
        export_model([loaded, other], tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    out = export_model([loaded], tmp_path / "ok")
    (out / "member_0.msgpack").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="member_0.msgpack"):
        load(out)


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


def test_cli_export_carries_a_recipe_chosen_elsewhere(tuned_run, tmp_path, capsys):
    from unet_jax.cli import main
    from unet_jax.inference import load

    gate = LearnedGate(("max_logit", "normal_logit"), (0.0, 0.0), (1.0, 2.0), (1.5, -1.0), 0.2)
    chosen = InferenceRecipe(
        threshold=0.4,
        flip_tta=True,
        gate="learned",
        gate_threshold=0.3,
        gate_model=gate,
        tuned_on="pooled out-of-fold predictions",
    )
    file = tmp_path / "inference.json"
    file.write_text(json.dumps({"recipe": chosen.to_dict(), "validation": {}}))
    assert main(["export", str(tuned_run), str(tuned_run), "--out", str(tmp_path / "m"), "--recipe", str(file)]) == 0
    assert "2 member(s)" in capsys.readouterr().out
    loaded = load(tmp_path / "m")
    assert loaded.recipe == chosen and len(loaded.all_variables) == 2
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    assert info["provenance"]["recipe_file"] == str(file)
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["export", str(tuned_run), "--out", str(tmp_path / "n"), "--recipe", str(tmp_path / "bad.json")]) != 0
    assert "bad.json" in capsys.readouterr().err
    assert main(["export", str(tuned_run), "--out", str(tmp_path / "n"), "--recipe", str(tmp_path / "none.json")]) != 0
    assert "could not be read" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


# ---- learned gates, the score table and nested choice (issue 19) -----------------------
def test_gate_features_closed_form():
    prob = np.zeros((1, 10, 10), np.float32)
    prob[0, 0, :3] = (0.9, 0.6, 0.2)  # top 1% of 100 pixels = the single largest
    f = gate_features(prob, np.array([[0.2, 0.3, 0.5]]))
    np.testing.assert_allclose(f[0, 0], np.log(0.9 / 0.1), rtol=1e-5)  # max_logit
    np.testing.assert_allclose(f[0, 1], np.log(0.9 / 0.1), rtol=1e-5)  # top1_logit
    np.testing.assert_allclose(f[0, 2], np.log(0.02 + 1e-4), rtol=1e-6)  # 2 pixels above 0.5
    np.testing.assert_allclose(f[0, 3], np.log(1.7 / 100 + 1e-6), rtol=1e-5)  # mean probability
    np.testing.assert_allclose(f[0, 4], 0.0, atol=1e-9)  # p(normal) = 0.5
    with pytest.raises(ValueError, match="class head"):
        gate_features(prob, None)
    with pytest.raises(ValueError, match="expected some of"):
        gate_features(prob, None, ("nope",))


def test_learned_gate_separates_what_the_features_separate():
    rng = np.random.default_rng(0)
    lesion = np.arange(40) < 28
    probs = rng.uniform(0, 0.3, (40, 16, 16)).astype(np.float32)
    probs[lesion, 4:9, 4:9] = rng.uniform(0.7, 1.0, (int(lesion.sum()), 5, 5))  # big, confident lesions
    probs[~lesion, 7, 7] = 0.6  # a single faint spot on normal images
    gate = fit_learned_gate(probs, None, lesion, ("max_logit", "log_area"))
    p = gate.lesion_probability(probs, None)
    assert p[lesion].min() > 0.5 > p[~lesion].max()
    same = LearnedGate(**json.loads(json.dumps(dataclasses.asdict(gate))))
    np.testing.assert_allclose(same.lesion_probability(probs, None), p)
    with pytest.raises(ValueError, match="with and without"):
        fit_learned_gate(probs, None, np.ones(40, bool), ("max_logit",))
    with pytest.raises(ValueError, match="one entry per feature"):
        LearnedGate(("max_logit",), (0.0,), (1.0, 2.0), (1.0,), 0.0)


def test_learned_gate_recipe_round_trip_and_application():
    gate = LearnedGate(("max_logit",), (0.0,), (1.0,), (1.0,), 0.0)  # p(lesion) = max probability
    recipe = InferenceRecipe(gate="learned", gate_threshold=0.7, gate_model=gate)
    assert InferenceRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    assert "learned gate" in recipe.describe()
    prob = np.full((8, 8), 0.1, np.float32)
    prob[2:5, 2:5] = 0.65
    assert not recipe_mask(prob, None, recipe, (8, 8)).any()  # p(lesion) = 0.65 < 0.7
    prob[3, 3] = 0.8
    assert recipe_mask(prob, None, recipe, (8, 8)).any()
    with pytest.raises(ValueError, match="gate_model"):
        InferenceRecipe(gate="learned", gate_threshold=0.5)
    with pytest.raises(ValueError, match="gate_model"):
        InferenceRecipe(gate_model=gate)
    with pytest.raises(ValueError, match="gate_model"):
        InferenceRecipe.from_dict({"gate": "learned", "gate_model": {"features": ["max_logit"]}})


def test_table_outcome_matches_applying_the_recipe():
    probs, gts, classes = _synthetic_validation()
    flipped = probs[:, :, ::-1].copy()
    scores = score_recipes(probs, flipped, gts)
    gate = fit_learned_gate(probs, classes, np.array([g.any() for g in gts]), ("max_logit", "normal_logit"))
    for recipe in (
        InferenceRecipe(threshold=0.4, flip_tta=True, gate="class", gate_threshold=0.5),
        InferenceRecipe(threshold=0.6, gate="area", gate_threshold=0.05, components="largest"),
        InferenceRecipe(gate="max_prob", gate_threshold=0.92, fill_holes=True),
        InferenceRecipe(threshold=0.3, gate="learned", gate_threshold=0.5, gate_model=gate),
    ):
        dice, iou, empty = recipe_outcome(scores, recipe, classes)
        maps = 0.5 * (probs + flipped) if recipe.flip_tta else probs
        masks = [recipe_mask(maps[i], classes[i], recipe, gts[i].shape) for i in range(len(gts))]
        np.testing.assert_allclose(dice, [M.dice(m, g) for m, g in zip(masks, gts)])
        np.testing.assert_allclose(iou, [M.iou(m, g) for m, g in zip(masks, gts)])
        np.testing.assert_array_equal(empty, [not m.any() for m in masks])


def test_choosing_on_a_subset_is_tuning_on_that_subset():
    probs, gts, classes = _synthetic_validation(seed=3)
    probs[12:15] += np.float32(0.3)  # three normal images look like lesions to max_prob
    scores = score_recipes(probs, None, gts)
    idx = np.array([0, 2, 4, 5, 7, 9, 12, 13, 15, 17])
    chosen, report = choose_recipe(scores, classes, idx=idx, learned_gates=("map", "map+head"))
    direct, direct_report = tune_recipe(
        probs[idx], None, classes[idx], [gts[i] for i in idx], learned_gates=("map", "map+head")
    )
    assert chosen == direct and report == direct_report
    assert any(k.startswith("gate learned map+head") for k in report["levers"])


def test_a_learned_gate_is_chosen_where_no_single_statistic_separates():
    # Normal images: a small blob at 0.9. Lesions: large at 0.8, or small at 0.995. Neither
    # the maximum nor the area alone separates them; together they do.
    probs, gts = [], []
    for i in range(30):
        p = np.full((16, 16), 0.05, np.float32)
        gt = np.zeros((16, 16), bool)
        if i < 10:
            p[7:9, 7:9] = 0.9
        elif i < 20:
            p[3:9, 3:9], gt[3:9, 3:9] = 0.8, True
        else:
            p[7:9, 7:9], gt[7:9, 7:9] = 0.995, True
        probs.append(p)
        gts.append(gt)
    flat = np.tile([[0.4, 0.3, 0.3]], (30, 1))
    recipe, report = tune_recipe(np.stack(probs), None, flat, gts, learned_gates=("map",), max_lesion_empty=0.0)
    assert recipe.gate == "learned" and recipe.gate_model.features == (
        "max_logit",
        "top1_logit",
        "log_area",
        "log_mass",
    )
    assert report["chosen"]["normal_false_positive_rate"] == 0.0 and report["chosen"]["lesion_empty_rate"] == 0.0
    assert report["levers"]["gate max_prob 0.5 (best alone)"]["normal_false_positive_rate"] == 1.0
    with pytest.raises(ValueError, match="designs"):
        tune_recipe(np.stack(probs), None, flat, gts, learned_gates=("magic",))
