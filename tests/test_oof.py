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
