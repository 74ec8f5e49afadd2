"""`unet-jax predict`: what it reads (mask files skipped, odd images), where it may write
(never over its inputs or a BUSI ground truth) and what it says about the recipe."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from _train_helpers import TINY, save_untrained_run
from PIL import Image

from unet_jax.cli import main
from unet_jax.data import write_phantom
from unet_jax.inference import InferenceRecipe, connected_components, export_model, load
from unet_jax.predict import TABLE_COLUMNS, plan_prediction, predict_files


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(save_untrained_run(tmp_path_factory.mktemp("predict") / "run"))


@pytest.fixture(scope="module")
def untuned(loaded, tmp_path_factory):
    return export_model([loaded], tmp_path_factory.mktemp("untuned") / "m")


@pytest.fixture
def busi(tmp_path):
    write_phantom(tmp_path / "busi", counts={"benign": 2, "malignant": 1, "normal": 1}, size=(40, 48), seed=1)
    return tmp_path / "busi"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predicting_into_the_input_folder_is_refused(untuned, busi, capsys):
    folder = busi / "benign"
    before = _snapshot(busi)
    inputs = sorted(str(p) for p in folder.glob("*.png"))  # `F/*.png`: images and masks
    assert main(["predict", "--checkpoint", str(untuned), *inputs, "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"unet-jax predict: error: output folder {str(folder)!r} holds the input")
        and err.count("\n") == 1
    )
    assert _snapshot(busi) == before


def test_a_folder_holding_busi_masks_is_refused_even_without_its_images(untuned, busi, tmp_path, capsys):
    image = tmp_path / "elsewhere" / "benign (1).png"
    image.parent.mkdir()
    image.write_bytes((busi / "benign" / "benign (1).png").read_bytes())
    before = _snapshot(busi)
    assert main(["predict", "--checkpoint", str(untuned), str(image), "--out", str(busi / "benign")]) == 2
    assert "holds the BUSI mask 'benign (1)_mask.png'" in capsys.readouterr().err
    assert _snapshot(busi) == before


def test_mask_files_among_the_inputs_are_skipped_with_a_note(untuned, busi, tmp_path, capsys):
    inputs = sorted(str(p) for p in (busi / "benign").glob("*.png"))
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(untuned), *inputs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    masks = [i for i in inputs if "_mask" in Path(i).name]
    assert masks and all(f"{m}: skipped: a mask file" in printed for m in masks)
    assert sorted(p.name for p in out.iterdir()) == [
        "benign (1)_mask.png",
        "benign (1)_overlay.png",
        "benign (2)_mask.png",
        "benign (2)_overlay.png",
        "predictions.csv",
        "predictions.json",
        "report.html",
    ]
    # a second run into the same output folder (its X_mask.png have no X.png) is fine
    assert main(["predict", "--checkpoint", str(untuned), *inputs, "--out", str(out)]) == 0
    with pytest.raises(ValueError, match=r"no image to predict: all 2 input\(s\) are mask files"):
        plan_prediction(masks, tmp_path / "other")


@pytest.mark.parametrize("case", ["under a file", "is a file", "not writable"])
def test_an_unwritable_output_is_one_line_before_the_model_loads(case, tmp_path, busi, capsys, monkeypatch):
    import tempfile

    import unet_jax.cli as cli

    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = {"under a file": blocker / "pred", "is a file": blocker, "not writable": tmp_path / "ro" / "pred"}[case]
    if case == "not writable":  # as root, permissions do not stop a write: fail the write itself

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile.TemporaryDirectory, "__init__", refuse)
    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    image = str(busi / "benign" / "benign (1).png")
    assert main(["predict", image, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    expected = {
        "under a file": f"cannot be created: {str(blocker)!r} is a file",
        "is a file": f"output {str(blocker)!r} is a file; expected a folder",
        "not writable": "is not writable (PermissionError: Permission denied)",
    }[case]
    assert err.startswith("unet-jax predict: error: ") and expected in err and err.count("\n") == 1, err
    assert blocker.read_text() == "x" and not (tmp_path / "ro").exists()


# ---- the recipe ----------------------------------------------------------------------
def test_no_tuned_recipe_is_said(untuned, loaded, busi, tmp_path, capsys):
    image = str(busi / "malignant" / "malignant (1).png")
    assert main(["predict", "--checkpoint", str(untuned), image, "--out", str(tmp_path / "a")]) == 0
    assert "raw model output, no tuned recipe" in capsys.readouterr().out
    tuned = export_model([loaded], tmp_path / "tuned", recipe=InferenceRecipe(threshold=0.4, tuned_on="validation"))
    assert main(["predict", "--checkpoint", str(tuned), image, "--out", str(tmp_path / "b")]) == 0
    assert "no tuned recipe" not in capsys.readouterr().out
    assert main(["predict", "--checkpoint", str(untuned), image, "--out", str(tmp_path / "c"), "--raw"]) == 0
    assert "no tuned recipe" not in capsys.readouterr().out  # asked for: nothing to warn about


# ---- odd images --------------------------------------------------------------------------
def _predict_one(loaded, path, tmp_path):
    return predict_files(loaded, [path], tmp_path / "out")[0]


@pytest.mark.parametrize("size", [(1, 1), (15, 40)])
def test_a_too_small_image_is_refused(loaded, tmp_path, size):
    path = tmp_path / "tiny.png"
    Image.fromarray(np.full(size, 90, np.uint8)).save(path)
    result = _predict_one(loaded, path, tmp_path)
    assert result.mask is None and f"image of {size[1]}x{size[0]} pixels is too small" in result.error


def test_a_multi_frame_image_is_refused(loaded, tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.fromarray(np.full((32, 32), v, np.uint8)) for v in (10, 200, 90)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    result = _predict_one(loaded, path, tmp_path)
    assert result.mask is None and "has 3 frames" in result.error and "expected a single image" in result.error


def test_a_cmyk_jpeg_is_converted(loaded, tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (TINY.image_size, 40, 3), dtype=np.uint8)
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    result = _predict_one(loaded, path, tmp_path)
    assert result.error is None and Image.open(result.mask).size == (40, TINY.image_size)


def test_the_table_has_one_row_per_input_with_the_final_masks_numbers(untuned, busi, tmp_path, capsys):
    images = sorted((busi / "benign").glob("benign (?).png"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    mask_file = busi / "benign" / "benign (1)_mask.png"
    inputs = [str(mask_file), *map(str, images), str(bad)]
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(untuned), *inputs, "--out", str(out), "--raw"]) == 1
    assert "[2/4] " in capsys.readouterr().out  # the per-image line is still printed
    rows = json.loads((out / "predictions.json").read_text())
    with open(out / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["input"] for r in rows] == [r["input"] for r in table] == inputs
    assert list(rows[0]) == list(table[0]) == list(TABLE_COLUMNS)
    assert "skipped: a mask file" in rows[0]["note"] and rows[0]["mask"] is None and table[0]["mask"] == ""
    assert "unreadable image" in rows[-1]["error"] and rows[-1]["lesion_present"] is None
    for row, csv_row in zip(rows[1:3], table[1:3], strict=True):
        mask = np.asarray(Image.open(row["mask"])) > 0
        assert row["area_px"] == int(mask.sum()) and row["lesion_present"] == bool(mask.any())
        assert row["components"] == connected_components(mask)[1]
        assert 0.0 <= row["max_probability"] <= 1.0 and row["area_mm2"] is None and csv_row["area_mm2"] == ""
        assert row["recipe"] == "raw" and row["gate_emptied"] is None and row["error"] is None
        assert row["p_benign"] is None and csv_row["p_benign"] == ""  # the tiny model has no class head
        assert int(csv_row["area_px"]) == row["area_px"] and Path(row["overlay"]).is_file()


def test_the_table_reports_the_recipe_its_gate_and_the_class_head(busi, tmp_path):
    bundled = load(None)
    image = busi / "normal" / "normal (1).png"
    results = predict_files(bundled, [image], tmp_path / "pred")
    (result,) = results
    assert result.recipe == bundled.recipe.describe() and bundled.recipe.gate == "learned"
    assert isinstance(result.gate_emptied, bool) and 0.0 <= result.gate_score <= 1.0
    assert result.gate_emptied == (result.gate_score < bundled.recipe.gate_threshold)
    if result.gate_emptied:
        assert not result.lesion_present and result.area_px == 0 and result.components == 0
    assert len(result.class_probabilities) == 3 and abs(sum(result.class_probabilities) - 1) < 1e-4
    row = json.loads((tmp_path / "pred" / "predictions.json").read_text())[0]
    assert [row["p_benign"], row["p_malignant"], row["p_normal"]] == pytest.approx(result.class_probabilities)


def test_probability_maps_match_each_other_and_the_mask(loaded, busi, tmp_path):
    image = busi / "malignant" / "malignant (1).png"
    # raw: no gate, no post-processing; 0.7 splits the untrained model's map about in half
    (png,) = predict_files(loaded, [image], tmp_path / "png", 0.7, raw=True, save_probabilities="png16")
    (npy,) = predict_files(loaded, [image], tmp_path / "npy", 0.7, raw=True, save_probabilities="npy")
    assert png.probability.endswith("malignant (1)_prob.png") and npy.probability.endswith("malignant (1)_prob.npy")
    with Image.open(png.probability) as im:
        sixteen = np.asarray(im).astype(np.float64) / 65535
    prob = np.load(npy.probability)
    assert prob.dtype == np.float32 and prob.shape == sixteen.shape == (40, 48)
    assert np.abs(sixteen - prob).max() <= 1 / 65535
    mask = np.asarray(Image.open(npy.mask)) > 0
    assert 0 < mask.sum() < mask.size and np.array_equal(prob > 0.7, mask)
    row = json.loads((tmp_path / "npy" / "predictions.json").read_text())[0]
    assert row["probability"] == npy.probability
    with pytest.raises(ValueError, match=r"save_probabilities = 'tiff'; expected one of \['png16', 'npy'\]"):
        predict_files(loaded, [image], tmp_path / "x", save_probabilities="tiff")


def test_overlays_outline_the_mask_with_a_legend_or_fill_it_as_before(loaded, busi, tmp_path):
    from unet_jax.metrics import boundary
    from unet_jax.plots import legend_size, overlay

    image = busi / "malignant" / "malignant (1).png"
    (contour,) = predict_files(loaded, [image], tmp_path / "c", threshold=0.7)
    (fill,) = predict_files(loaded, [image], tmp_path / "f", threshold=0.7, overlay_style="fill")
    rgb = np.asarray(Image.open(image).convert("RGB"))
    mask = np.asarray(Image.open(contour.mask)) > 0
    drawn = np.asarray(Image.open(contour.overlay))
    w, h = legend_size([f"max p(lesion) {contour.max_probability:.2f}"])
    away = np.ones(mask.shape, bool)
    away[:h, :w] = False
    edge = boundary(mask)
    assert (edge & away).sum() > 10 and (mask & ~edge).any()
    np.testing.assert_array_equal(drawn[edge & away], [[255, 0, 0]] * int((edge & away).sum()))
    np.testing.assert_array_equal(drawn[~edge & away], rgb[~edge & away])
    np.testing.assert_array_equal(np.asarray(Image.open(fill.overlay)), overlay(rgb, mask, color=(255, 0, 0)))
    with pytest.raises(ValueError, match=r"overlay = 'dots'; expected one of \['contour', 'fill'\]"):
        predict_files(loaded, [image], tmp_path / "x", overlay_style="dots")


def test_the_cli_passes_the_probability_format_and_overlay_style(untuned, busi, tmp_path, capsys):
    image = busi / "benign" / "benign (1).png"
    out = tmp_path / "pred"
    args = ["predict", "--checkpoint", str(untuned), str(image), "--out", str(out)]
    assert main([*args, "--save-probabilities", "png16", "--overlay", "fill"]) == 0
    row = json.loads((out / "predictions.json").read_text())[0]
    assert row["probability"] == str(out / "benign (1)_prob.png")
    with Image.open(row["probability"]) as im:
        assert im.size == (48, 40) and np.asarray(im).max() > 255  # 16-bit values
    mask = np.asarray(Image.open(row["mask"])) > 0
    rgb = np.asarray(Image.open(image).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(Image.open(row["overlay"]))[~mask], rgb[~mask])
    with pytest.raises(SystemExit):
        main([*args, "--save-probabilities", "tiff"])
    assert "invalid choice: 'tiff'" in capsys.readouterr().err


# ---- never over a file predict did not write (issue 30) -----------------------------------
@pytest.mark.parametrize("name", ["x_mask.png", "x_overlay.png", "predictions.csv", "report.html"])
def test_a_file_predict_did_not_write_is_never_overwritten(untuned, busi, tmp_path, capsys, monkeypatch, name):
    import unet_jax.cli as cli

    gt = tmp_path / "gtdir"  # a ground-truth mask without its image beside it
    gt.mkdir()
    (gt / name).write_bytes((busi / "benign" / "benign (1)_mask.png").read_bytes())
    image = tmp_path / "other" / "x.png"
    image.parent.mkdir()
    image.write_bytes((busi / "benign" / "benign (1).png").read_bytes())
    before = _snapshot(gt)
    monkeypatch.setattr(cli, "_load_model", lambda args: pytest.fail("the model was loaded"))
    assert main(["predict", str(image), "--out", str(gt)]) == 2
    err = capsys.readouterr().err
    assert f"output folder {str(gt)!r} holds {name!r}, which predict did not write" in err, err
    assert err.count("\n") == 1 and _snapshot(gt) == before
    with pytest.raises(ValueError, match="which predict did not write"):
        predict_files(load(untuned), [image], gt)
    assert _snapshot(gt) == before


def test_predict_may_replace_its_own_outputs_of_an_earlier_run(untuned, busi, tmp_path, capsys):
    out = tmp_path / "pred"
    first, second = busi / "benign" / "benign (1).png", busi / "malignant" / "malignant (1).png"
    assert main(["predict", "--checkpoint", str(untuned), str(first), "--out", str(out)]) == 0
    assert main(["predict", "--checkpoint", str(untuned), str(second), "--out", str(out)]) == 0
    # benign (1)_mask.png is no longer in the table, but it carries predict's mark
    assert (
        main(["predict", "--checkpoint", str(untuned), str(first), "--out", str(out), "--save-probabilities", "npy"])
        == 0
    )
    assert (
        main(["predict", "--checkpoint", str(untuned), str(first), "--out", str(out), "--save-probabilities", "npy"])
        == 0
    )
    capsys.readouterr()


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(loaded, tmp_path, monkeypatch):
    names = ["=1+1.png", "+SUM(1+1).png", "@cmd.png", "-2+3.png"]
    pixels = (np.random.default_rng(0).random((40, 48)) * 255).astype(np.uint8)
    for name in names:
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "=bad.png").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path)  # relative paths: the cells start with "=", "+", "-", "@"
    results = predict_files(loaded, [*names, "=bad.png"], "=out")
    with open(tmp_path / "=out" / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["input"] for r in rows] == [f"'{n}" for n in [*names, "=bad.png"]]  # OWASP: a leading quote
    for row, result in zip(rows, results, strict=True):
        for column in TABLE_COLUMNS:  # no cell starts a formula
            assert not row[column] or row[column][0] not in "=+-@", (column, row[column])
        if result.error is None:  # paths escaped, numbers still numbers
            assert row["mask"] == "'" + result.mask and row["area_px"] == str(result.area_px)
            assert float(row["max_probability"]) == pytest.approx(result.max_probability)
    assert rows[-1]["error"].startswith("'=bad.png: unreadable image")
    assert json.loads((tmp_path / "=out" / "predictions.json").read_text())[0]["input"] == "=1+1.png"  # JSON: raw


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares ``width`` x ``height`` (8-bit grayscale) and holds no
    pixels: what is read of a file before its pixels are decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_an_image_over_the_largest_size_is_refused_naming_it_before_decoding(loaded, tmp_path, capsys):
    from unet_jax.predict import MAX_PIXELS

    assert MAX_PIXELS == 8192 * 8192
    big = _png_header(tmp_path / "huge.png", 9000, 8000)  # 72 MP: over the limit, under PIL's bomb check
    result = _predict_one(loaded, big, tmp_path)
    assert result.error == (
        f"{big}: image of 9000x8000 pixels (72.0 megapixels) is too large; expected at most "
        f"{MAX_PIXELS} pixels (67.1 megapixels, e.g. 8192x8192): crop or downscale it"
    )
    assert main(["predict", str(big), "--out", str(tmp_path / "cli")]) == 1
    assert f"[1/1] skipped: {big}: image of 9000x8000 pixels" in capsys.readouterr().err
