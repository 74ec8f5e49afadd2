"""The figures, as tests: files appear atomically, are valid PNGs of plausible size, and
the overlay paints exactly where the mask is."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_jax import plots


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def history(epochs: int = 6, with_dice: bool = True) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        row = {
            "epoch": e,
            "train/loss": 1 / e,
            "val/loss": 1 / e + 0.1 * (e > 4),
            "train/pixel_accuracy": 1 - 0.5 / e,
            "val/pixel_accuracy": 1 - 0.6 / e,
        }
        if with_dice:
            row.update({"train/dice": 1 - 1 / e, "val/dice": 0.9 - 1 / e})
        rows.append(row)
    return rows


def test_importing_unet_jax_does_not_import_matplotlib():
    import subprocess

    code = "import unet_jax, unet_jax.plots, unet_jax.metrics, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("with_dice, panels", [(True, 3), (False, 2)])
def test_training_curves_png(tmp_path, with_dice, panels):
    path = plots.plot_training_curves(history(with_dice=with_dice), tmp_path / "curves" / "c.png")
    assert path == tmp_path / "curves" / "c.png"
    rgb = read_png(path)
    h, w, _ = rgb.shape
    # 4.5 in per panel x 3.6 in at 100 dpi.
    assert w == pytest.approx(450 * panels, abs=5) and h == pytest.approx(360, abs=5)
    assert rgb.std() > 10  # something was drawn
    assert no_temporary_files(path.parent)


def test_training_curves_tolerate_gaps_and_refuse_nothing(tmp_path):
    rows = history(4)
    rows[1]["val/dice"] = None
    rows[2]["val/loss"] = float("nan")
    del rows[3]["epoch"]
    plots.plot_training_curves(rows, tmp_path / "gaps.png", title="gaps")
    assert (tmp_path / "gaps.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no 'train/<metric>'"):
        plots.plot_training_curves([{"epoch": 1, "lr": 1e-3}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_prediction_grid_png(tmp_path):
    rng = np.random.default_rng(0)
    images, masks, preds = [], [], []
    for i, (h, w) in enumerate([(40, 50), (32, 32), (60, 45), (30, 40), (36, 36)]):
        images.append(rng.random((h, w)) if i % 2 else (rng.random((h, w, 3)) * 255).astype(np.uint8))
        m = np.zeros((h, w), bool)
        m[5:20, 8:25] = True
        masks.append(m)
        preds.append(np.roll(m, 3, axis=1) if i != 1 else np.zeros_like(m))  # one empty prediction
    path = plots.prediction_grid(
        images, masks, preds, tmp_path / "grid.png", titles=[f"dice {i}" for i in range(5)], max_items=4, ncols=2
    )
    rgb = read_png(path)
    # 2 x 2 cells of 3.0 x 3.1 in, plus 0.4 in for the legend, at 100 dpi.
    assert rgb.shape[1] == pytest.approx(600, abs=5) and rgb.shape[0] == pytest.approx(660, abs=5)
    # Green and red contour pixels are both there.
    r, g, b = (rgb[..., i].astype(int) for i in range(3))
    assert ((g > 150) & (r < 80) & (b < 80)).sum() > 20
    assert ((r > 180) & (g < 80) & (b < 80)).sum() > 20
    assert no_temporary_files(tmp_path)
    with pytest.raises(ValueError, match="masks"):
        plots.prediction_grid(images, masks[:2], preds, tmp_path / "bad.png")


def test_overlay_paints_the_mask_only():
    image = np.full((6, 8), 0.5, np.float32)  # gray 128 after rounding
    mask = np.zeros((6, 8), bool)
    mask[1:4, 2:6] = True
    out = plots.overlay(image, mask, color=(255, 0, 0), alpha=0.5)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[~mask], 128)
    np.testing.assert_array_equal(out[mask], [[192, 64, 64]] * int(mask.sum()))  # (128 + 255)/2, 128/2
    # alpha 0: the image; alpha 1: the colour; RGB uint8 input kept as is outside the mask.
    np.testing.assert_array_equal(plots.overlay(image, mask, alpha=0.0), 128)
    painted = plots.overlay(image, mask, (0, 200, 0), alpha=1.0)
    np.testing.assert_array_equal(painted[mask], [[0, 200, 0]] * 12)
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(plots.overlay(rgb, mask)[~mask], rgb[~mask])
    # outline: the mask's border ring is the solid colour, its inside only tinted.
    ring = plots.overlay(image, mask, color=(255, 0, 0), alpha=0.5, outline=True)
    np.testing.assert_array_equal(ring[1, 2], [255, 0, 0])
    np.testing.assert_array_equal(ring[2, 3], [192, 64, 64])
    with pytest.raises(ValueError, match="does not match"):
        plots.overlay(image, mask[:5])


def test_write_png_roundtrip(tmp_path):
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:5] = True
    path = plots.write_png(mask, tmp_path / "m" / "mask.png")
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (7, 5)
        np.testing.assert_array_equal(np.asarray(im), mask.astype(np.uint8) * 255)
    rgb = plots.overlay(np.zeros((5, 7)), mask)
    np.testing.assert_array_equal(read_png(plots.write_png(rgb, tmp_path / "o.png")), rgb)
    assert no_temporary_files(tmp_path / "m") and no_temporary_files(tmp_path)
    with pytest.raises(ValueError, match="uint8"):
        plots.write_png(np.zeros((2, 2), np.float32), tmp_path / "f.png")


def test_contour_overlay_draws_exactly_the_boundary_and_leaves_the_rest():
    from unet_jax.metrics import boundary

    rgb = np.random.default_rng(1).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    mask = np.zeros((80, 120), bool)
    mask[40:70, 40:70] = True
    mask[45:50, 45:50] = False  # a hole: its rim is boundary too
    out = plots.contour_overlay(rgb, [(mask, (255, 0, 0))])
    edge = boundary(mask)
    np.testing.assert_array_equal(out[edge], [[255, 0, 0]] * int(edge.sum()))
    np.testing.assert_array_equal(out[~edge], rgb[~edge])  # inside and outside untouched
    # two masks (truth in green, then the prediction in red on top) and a legend box
    truth = np.zeros_like(mask)
    truth[20:55, 38:60] = True
    legend = ["max p(lesion) 0.93", "p(benign) 0.10"]
    w, h = plots.legend_size(legend)
    assert 0 < w < 120 and 0 < h < 40
    both = plots.contour_overlay(rgb, [(truth, plots.GT_COLOR), (mask, plots.PRED_COLOR)], legend=legend)
    away = np.ones_like(mask)
    away[:h, :w] = False
    green = boundary(truth) & ~edge
    np.testing.assert_array_equal(both[edge & away], [plots.PRED_COLOR] * int((edge & away).sum()))
    np.testing.assert_array_equal(both[green & away], [plots.GT_COLOR] * int((green & away).sum()))
    rest = away & ~edge & ~green
    np.testing.assert_array_equal(both[rest], rgb[rest])
    assert not np.array_equal(both[:h, :w], rgb[:h, :w])  # the legend is drawn
    thick = plots.contour_overlay(rgb, [(mask, (255, 0, 0))], width=2)
    assert (np.all(thick == [255, 0, 0], axis=-1) & mask).sum() > edge.sum()
    with pytest.raises(ValueError, match="at least 1 pixel"):
        plots.contour_overlay(rgb, [(mask, (255, 0, 0))], width=0)
