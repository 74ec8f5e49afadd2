"""The comparison experiment (experiments/compare.py): one command, one split, one table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", REPO / "experiments" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module
    spec.loader.exec_module(module)
    return module


def test_every_row_is_a_valid_config_and_sam_without_weights_is_not_run(compare):
    for profile in ("full", "cpu"):
        rows = compare.entries(profile, None, {})
        keys = [r.key for r in rows]
        assert keys == ["unet_seed", "unet_best", "resnet34_unet", "resnet18_classifier", "unet_class_head", "sam_vit_b"]
        sam = rows[-1]
        assert sam.config is None and "not run" in sam.note and "weights" in sam.note
        assert len({(r.config.split, r.config.split_seed, r.config.classes) for r in rows[:-1]}) == 1  # one split
    zero_shot, with_weights = compare.entries("full", "sam_vit_b_01ec64.pth", {})[-2:]
    assert with_weights.config.init_from == "sam_vit_b_01ec64.pth" and "PROMPTED" in with_weights.label
    assert with_weights.config.freeze == ("image_encoder", "prompt_encoder")
    assert zero_shot.config.epochs == 0 and "PROMPTED" in zero_shot.label


def test_one_command_trains_on_one_split_and_prints_one_table(compare, tmp_path, capsys):
    from unet_jax.data.phantom import write_phantom

    data = tmp_path / "data"
    write_phantom(data, {"benign": 14, "malignant": 10, "normal": 6}, size=(48, 48), seed=0)
    out = tmp_path / "compare"
    compare.main(["--out", str(out), "--profile", "cpu", "--data", str(data), "--only", "unet_seed",
                  "resnet18_classifier", "--set", "epochs=1", "image_size=32", "batch_size=4", "eval_batch_size=8",
                  ])
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert any(line.startswith("| U-Net seed") for line in lines)
    assert any(line.startswith("| ResNet-18 classifier") for line in lines)
    assert any("SAM ViT-B" in line and "not run" in line for line in lines)
    assert any(line.startswith("| U-Net (the report) | 0.9451") for line in lines)
    for key in ("unet_seed", "resnet18_classifier"):  # every run reads the one split
        assert json.loads((out / key / "config.json").read_text())["manifest"] == str(out / "split.json")
        assert json.loads((out / key / "split.json").read_text())["partitions"] == \
            json.loads((out / "split.json").read_text())["partitions"]
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert all(r["inference_images_per_s"] > 0 and r["parameters"] > 0 for r in rows)
    assert rows[0]["dice"] is not None and rows[1]["class_accuracy"] is not None
