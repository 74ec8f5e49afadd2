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
        assert keys == [
            "unet_seed",
            "unet_best",
            "resnet34_unet",
            "resnet18_classifier",
            "unet_class_head",
            "sam_vit_b",
        ]
        sam = rows[-1]
        assert sam.config is None and "not run" in sam.note and "weights" in sam.note
        assert len({(r.config.split, r.config.split_seed, r.config.classes) for r in rows[:-1]}) == 1  # one split
    zero_shot, with_weights = compare.entries("full", "sam_vit_b_01ec64.pth", {})[-2:]
    assert with_weights.config.init_from == "sam_vit_b_01ec64.pth" and "PROMPTED" in with_weights.label
    assert with_weights.config.freeze == ("image_encoder", "prompt_encoder")
    assert zero_shot.config.epochs == 0 and "PROMPTED" in zero_shot.label


def test_one_command_trains_on_one_split_and_prints_one_table(compare, tmp_path, capsys):
    """The row with both heads (U-Net + class head), narrowed, through the whole command."""
    from unet_jax.data.phantom import write_phantom

    data = tmp_path / "data"
    write_phantom(data, {"benign": 14, "malignant": 10, "normal": 6}, size=(48, 48), seed=0)
    out = tmp_path / "compare"
    compare.main(
        [
            "--out",
            str(out),
            "--profile",
            "cpu",
            "--data",
            str(data),
            "--only",
            "unet_class_head",
            "--set",
            "epochs=1",
            "image_size=32",
            "batch_size=4",
            "eval_batch_size=8",
            "model.features=4",
            "model.depth=2",
        ]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    row = next(line for line in lines if line.startswith("| U-Net + bottleneck class head"))
    assert "-" not in row.split("|")[2:10]  # accuracy, loss, Dice, IoU, HD95, normal FP, class acc, AUC
    assert any("SAM ViT-B" in line and "not run" in line for line in lines)
    assert any(line.startswith("| U-Net (the report) | 0.9451") for line in lines)
    assert json.loads((out / "unet_class_head" / "config.json").read_text())["manifest"] == str(out / "split.json")
    assert (
        json.loads((out / "unet_class_head" / "split.json").read_text())["partitions"]
        == json.loads((out / "split.json").read_text())["partitions"]
    )
    results = json.loads((out / "unet_class_head" / "results.json").read_text())
    assert "test" in results and "test_classification" in results
    assert results["test_training_resolution"]["test/bce"] > 0
    (row_json,) = json.loads((out / "compare.json").read_text())["rows"]
    assert row_json["inference_images_per_s"] > 0 and row_json["parameters"] == sum(
        results["parameters"][k] for k in ("trainable", "non_trainable")
    )


def test_litemedsam_rows_join_the_table_with_the_contamination_note(compare, tmp_path):
    """experiments/litemedsam.py's results files become table rows marked * (contaminated:
    MedSAM's training data includes BUSI); prompted rows have no normal FP rate."""
    summary = {
        "pixel_accuracy": 0.97,
        "bce": 0.08,
        "dice_lesion": {"mean": 0.9},
        "iou_lesion": {"mean": 0.82},
        "hd95_lesion": {"mean": 12.0},
        "normal_false_positive_rate": {"rate": 0.25},
    }
    common = {"summary": summary, "contamination": "may have been seen in pretraining", "cpu_img_per_s": 0.3}
    (tmp_path / "released.json").write_text(
        json.dumps({**common, "prompted": True, "parameters": {"trainable": 9_791_300, "batch_norm_statistics": 9_856}})
    )
    (tmp_path / "auto.json").write_text(
        json.dumps(
            {
                **common,
                "prompted": False,
                "train_time_s": 60.0,
                "parameters": {"trainable": 1_000, "frozen_encoder": 5_726_740},
            }
        )
    )
    rows = compare.litemedsam_rows(tmp_path)
    assert [r["key"] for r in rows] == ["litemedsam_released", "litemedsam_auto"]
    assert rows[0]["normal_fp_rate"] is None and rows[1]["normal_fp_rate"] == 0.25
    assert rows[0]["parameters"] == 9_791_300 + 9_856 and rows[1]["parameters"] == 5_727_740
    text = compare.table(rows, [])
    line = next(x for x in text.splitlines() if x.startswith("| LiteMedSAM as released"))
    assert "(PROMPTED)*" in line and "| 0.9000 |" in line and line.rstrip().endswith("| 0.30 |")
    assert text.splitlines()[-1].startswith("* LiteMedSAM") and "BUSI" in text.splitlines()[-1]
    assert "| SAM (the report) | 0.9100 | 0.0668 |" in text
