"""The model shipped inside the package: it loads without network or Orbax, carries its
inference recipe and card, stays small, and segments a phantom lesion."""

from __future__ import annotations

import json

import numpy as np

from unet_jax.inference import bundled_path, load


def test_bundled_model_is_small_and_documented():
    folder = bundled_path()
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    assert "model.json" in files and "MODEL_CARD.md" in files
    assert sum(files.values()) <= 25 * 1000**2  # issue 19's budget for the whole ensemble
    info = json.loads((folder / "model.json").read_text())
    assert info["storage_dtype"] == "float16"
    assert len(info["members"]) == 5 and all(m in files for m in info["members"])  # the 5 fold models
    card = (folder / "MODEL_CARD.md").read_text()
    for needed in (
        "BUSI",
        "not a medical device",
        "python3 experiments/cv.py --config experiments/configs/ensemble_cpu.py",
        "python3 experiments/oof.py",
        "--recipe",
        "nested",
        "out-of-fold",
        "per image",
    ):
        assert needed in card


def test_bundled_model_segments_a_phantom_lesion(tmp_path):
    from unet_jax.cli import main
    from unet_jax.data import write_phantom

    loaded = load()
    assert loaded.recipe.tuned_on and "out-of-fold" in loaded.recipe.tuned_on
    data = tmp_path / "phantom"
    write_phantom(
        data, counts={"benign": 3, "malignant": 1, "normal": 1}, size=(160, 200), seed=11, multi_mask_fraction=0.0
    )
    image = sorted((data / "benign").glob("benign (1).png"))[0]
    out = tmp_path / "pred"
    assert main(["predict", str(image), "--out", str(out)]) == 0  # no --checkpoint: the bundled model
    from PIL import Image

    mask = np.asarray(Image.open(out / "benign (1)_mask.png")) > 0
    truth = np.asarray(Image.open(data / "benign" / "benign (1)_mask.png").convert("L")) > 0
    assert mask.shape == truth.shape
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.5, f"bundled model's Dice on a phantom lesion: {dice:.3f}"
