"""experiments/oof.py: the lesion-vs-normal ROC figure (a point per distinct threshold) and
the rate cells of its tables (Wilson intervals)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from unet_jax import metrics as M

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def oof():
    sys.path.insert(0, str(REPO / "experiments"))  # oof imports its sibling cv.py
    spec = importlib.util.spec_from_file_location("oof", REPO / "experiments" / "oof.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["oof"] = module
    spec.loader.exec_module(module)
    return module


def test_tied_scores_are_one_roc_point_and_the_area_is_the_aucs(oof):
    scores, positive = np.full(4, 0.7), np.array([True, False, True, False])
    fpr, tpr = oof.roc_points(scores, positive)
    np.testing.assert_array_equal(fpr, [0.0, 1.0])
    np.testing.assert_array_equal(tpr, [0.0, 1.0])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.5) == M.roc_auc(scores, positive)
    rng = np.random.default_rng(0)
    for _ in range(20):  # the plotted area is the legend's AUC, ties or not
        scores = rng.integers(0, 4, size=15).astype(float)
        positive = rng.random(15) < 0.5
        positive[:2] = [True, False]
        fpr, tpr = oof.roc_points(scores, positive)
        assert np.trapezoid(tpr, fpr) == pytest.approx(M.roc_auc(scores, positive))


def test_rate_cells_carry_wilson_intervals(oof):
    assert oof._rate({"count": 0, "n": 20, "rate": 0.0}) == "0/20 (0.0%) [0.000, 0.161]"
    assert oof._rate({"count": 1, "n": 20, "rate": 0.05}) == "1/20 (5.0%) [0.009, 0.236]"


def test_every_rate_cell_of_the_tables_has_its_interval(oof):
    fp = M.rate_summary([False] * 19 + [True])  # 1 of 20
    empty = M.rate_summary([False] * 30)  # 0 of 30
    summary = {"dice": {"lesion": {"mean": 0.7, "ci_low": 0.6, "ci_high": 0.8}}, "hd95": {"lesion": {"mean": 9.0}}}
    summary["iou"] = summary["dice"]
    summary |= {"normal_false_positive_rate": fp, "lesion_empty_prediction_rate": empty}
    lever = {"lesion_dice": 0.7, "normal_false_positive_rate": 0.05, "lesion_empty_rate": 0.0, "dice_all": 0.7}
    lever |= {"normal_false_positive": fp, "lesion_empty": empty}
    fold = {"fold": 0, "recipe": "r", "lesion_dice": 0.7, "lesion_iou": 0.6, "raw_lesion_dice": 0.5}
    fold |= {"normal_false_positive_rate": 0.05, "lesion_empty_prediction_rate": 0.0}
    fold |= {"normal_false_positive": fp, "lesion_empty_prediction": empty}
    member = {"lesion_dice": 0.7, "median_max_probability": 0.9, "auc_max_probability": 0.8, "auc_class_head": 0.8}
    member |= {"normal_false_positive_rate": 0.05, "lesion_empty_prediction_rate": 0.0}
    member |= {"normal_false_positive": fp, "lesion_empty_prediction": empty}
    results = {
        "nested_folds": [fold],
        "nested": summary,
        "nested_raw": summary,
        "recipe_description": "r",
        "pooled_choice": {"raw": lever, "levers": {}, "chosen": lever},
        "lesion_vs_normal_auc": {},
        "transfer": {"images": 50, "one member": member, "two-member average": member},
    }
    text = oof.format_tables(results)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "0.050" in line]
    assert len(rows) == 5  # the fold, two levers, two transfer rows
    assert all("0.050 [0.009, 0.236]" in row and "0.000 [0.000, 0.114]" in row for row in rows), rows


def test_the_ablation_lever_rows_carry_wilson_intervals(tmp_path):
    import json

    spec = importlib.util.spec_from_file_location("ablation", REPO / "experiments" / "ablation.py")
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    row = {"lesion_dice": 0.7, "normal_false_positive_rate": 0.05, "lesion_empty_rate": 0.0, "dice_all": 0.7}
    new = row | {"normal_false_positive": M.rate_summary([True] + [False] * 19), "lesion_empty": M.rate_summary([])}
    report = {"validation": {"raw": row, "levers": {"fill holes": new}, "chosen": new}}
    (tmp_path / "inference.json").write_text(json.dumps(report))
    rows = ablation.lever_rows(tmp_path)
    assert "| 0.050 | 0.000 |" in rows[0]  # a report from before the counts: the rates alone
    assert all("| 0.050 [0.009, 0.236] | 0.000 |" in r for r in rows[1:]) and len(rows) == 3
