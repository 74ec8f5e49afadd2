"""The metrics, as tests.

Read top to bottom: hand-made masks with values computed by hand; every empty-mask case
of the convention table; the exact distance transform and HD95 against brute force;
properties that hold for any pair of masks; resizing and thresholds; aggregation,
bootstrap intervals and the normal false-positive rate.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from unet_jax import metrics as M


def square(size: int, top: int, left: int, side: int, h: int | None = None) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[top : top + (h or side), left : left + side] = True
    return m


# --------------------------------------------------------------------------------------
# 1. Hand-made masks
# --------------------------------------------------------------------------------------
def test_two_overlapping_squares_by_hand():
    # A: rows/cols 2..5 (16 px); B: rows/cols 4..7 (16 px); A ∩ B: rows/cols 4..5 (4 px).
    a, b = square(10, 2, 2, 4), square(10, 4, 4, 4)
    row = M.image_metrics(a, b)
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (4, 12, 12, 72)
    assert row["dice"] == pytest.approx(2 * 4 / (16 + 16))  # 0.25
    assert row["iou"] == pytest.approx(4 / 28)  # |A ∪ B| = 16 + 16 - 4
    assert row["pixel_accuracy"] == pytest.approx((4 + 72) / 100)
    assert row["precision"] == pytest.approx(4 / 16)
    assert row["recall"] == pytest.approx(4 / 16)
    assert (row["pred_area"], row["gt_area"]) == (16, 16)


def test_prediction_inside_the_ground_truth():
    gt, pred = square(12, 2, 2, 8), square(12, 4, 4, 4)  # 64 px, 16 px inside it
    assert M.precision(pred, gt) == 1.0
    assert M.recall(pred, gt) == pytest.approx(16 / 64)
    assert M.dice(pred, gt) == pytest.approx(32 / 80)
    assert M.iou(pred, gt) == pytest.approx(16 / 64)
    assert M.pixel_accuracy(pred, gt) == pytest.approx(1 - 48 / 144)
    # Boundaries: pred's ring is 2 px inside gt's ring everywhere, gt's corners are
    # (2, 2) away from pred's corners: directed P95s are 2 and <= 2 * sqrt(2).
    d_pg, d_gp = M.surface_distances(pred, gt)
    np.testing.assert_allclose(d_pg, 2.0)
    assert d_gp.max() == pytest.approx(2 * math.sqrt(2))


def test_hd95_of_a_shifted_square():
    a, b = square(20, 5, 5, 6), square(20, 5, 8, 6)  # shifted 3 px to the right
    # Every boundary pixel of one square is at most 3 px from the other's boundary; the
    # left column of a (6 px of 20) is exactly 3 px away; most others are 0.
    d_ab, d_ba = M.surface_distances(a, b)
    assert d_ab.max() == pytest.approx(3.0) and d_ba.max() == pytest.approx(3.0)
    assert M.hd95(a, b) == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))
    assert M.hd95(a, a) == 0.0


def test_boundary_is_the_four_connected_edge_and_the_image_border_counts():
    m = square(6, 1, 1, 4)
    expected = m.copy()
    expected[2:4, 2:4] = False
    np.testing.assert_array_equal(M.boundary(m), expected)
    full = np.ones((4, 5), bool)
    assert M.boundary(full).sum() == 4 * 5 - 2 * 3  # the image border ring


# --------------------------------------------------------------------------------------
# 2. Empty masks: every case of the convention table
# --------------------------------------------------------------------------------------
EMPTY = np.zeros((8, 8), bool)
BLOB = square(8, 2, 2, 3)  # 9 px


def test_both_empty_is_a_perfect_score():
    row = M.image_metrics(EMPTY, EMPTY)
    for k in ("dice", "iou", "precision", "recall", "pixel_accuracy"):
        assert row[k] == 1.0, k
    assert row["hd95"] == 0.0


def test_false_alarm_on_an_empty_ground_truth_is_a_failure():
    row = M.image_metrics(BLOB, EMPTY)
    for k in ("dice", "iou", "precision", "recall"):
        assert row[k] == 0.0, k
    assert row["pixel_accuracy"] == pytest.approx(1 - 9 / 64)
    assert math.isnan(row["hd95"])


def test_missed_lesion_is_a_failure():
    row = M.image_metrics(EMPTY, BLOB)
    for k in ("dice", "iou", "precision", "recall"):
        assert row[k] == 0.0, k
    assert row["pixel_accuracy"] == pytest.approx(1 - 9 / 64)
    assert math.isnan(row["hd95"])


def test_the_convention_is_the_same_on_counts_host_and_device():
    import jax
    import jax.numpy as jnp

    counts = np.asarray([[0, 0, 0, 64], [0, 9, 0, 55], [0, 0, 9, 55], [4, 12, 12, 72]], np.float32).T
    host = M.scores_from_confusion(*counts)
    device = jax.jit(lambda *c: M.scores_from_confusion(*c))(*(jnp.asarray(c) for c in counts))
    for k, v in host.items():
        np.testing.assert_allclose(np.asarray(device[k]), v, rtol=1e-6)
    np.testing.assert_array_equal(host["dice"][:3], [1, 0, 0])
    np.testing.assert_array_equal(host["recall"][:3], [1, 0, 0])


def test_surface_distances_refuse_empty_masks():
    with pytest.raises(ValueError, match="non-empty"):
        M.surface_distances(EMPTY, BLOB)


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="resize_mask"):
        M.image_metrics(np.zeros((4, 4), bool), np.zeros((4, 5), bool))


# --------------------------------------------------------------------------------------
# 3. Exact Euclidean distance transform and HD95 against brute force
# --------------------------------------------------------------------------------------
def brute_squared_edt(features: np.ndarray) -> np.ndarray:
    """min over feature pixels f of |x - f|^2, for every pixel x."""
    fy, fx = np.nonzero(features)
    yy, xx = np.indices(features.shape)
    d2 = (yy[..., None] - fy) ** 2 + (xx[..., None] - fx) ** 2
    return d2.min(axis=-1).astype(np.float64)


def brute_hd95(a: np.ndarray, b: np.ndarray) -> float:
    """Pairwise distances between the boundary pixels, then the directed 95th percentiles."""
    pa, pb = np.argwhere(M.boundary(a)), np.argwhere(M.boundary(b))
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95)))


def random_mask(rng: np.random.Generator, shape, density: float) -> np.ndarray:
    """Random blobs: a thresholded smoothed noise field, plus single-pixel speckles."""
    noise = rng.random(shape)
    smooth = noise.copy()
    for axis in (0, 1):
        smooth = (smooth + np.roll(smooth, 1, axis) + np.roll(smooth, -1, axis)) / 3
    return (smooth < np.quantile(smooth, density)) | (noise < density / 20)


@pytest.mark.parametrize("seed", range(12))
def test_squared_edt_is_exact(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 24, size=2))
    features = rng.random(shape) < rng.uniform(0.01, 0.5)
    if not features.any():
        features[tuple(rng.integers(0, s) for s in shape)] = True
    np.testing.assert_array_equal(M.squared_edt(features), brute_squared_edt(features))


def test_squared_edt_matches_scipy():
    from scipy import ndimage  # the transform squared_edt wraps (its exactness: the brute-force test above)

    rng = np.random.default_rng(1)
    features = rng.random((61, 47)) < 0.02
    np.testing.assert_allclose(M.squared_edt(features), ndimage.distance_transform_edt(~features) ** 2)


@pytest.mark.parametrize("seed", range(10))
def test_hd95_matches_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    shape = tuple(rng.integers(6, 28, size=2))
    a = random_mask(rng, shape, rng.uniform(0.05, 0.5))
    b = random_mask(rng, shape, rng.uniform(0.05, 0.5))
    assert M.hd95(a, b) == pytest.approx(brute_hd95(a, b), abs=1e-9)


def test_hd95_on_a_native_size_image_is_fast_enough():
    # BUSI images are about 500 x 600; evaluation calls this once per test image.
    yy, xx = np.indices((500, 600))
    gt = (yy - 250) ** 2 / 120**2 + (xx - 300) ** 2 / 180**2 < 1
    pred = (yy - 262) ** 2 / 110**2 + (xx - 290) ** 2 / 190**2 < 1
    import time

    start = time.perf_counter()
    value = M.hd95(pred, gt)
    assert time.perf_counter() - start < 2.0
    assert 10 < value < 30


# --------------------------------------------------------------------------------------
# 4. Properties for any pair of masks
# --------------------------------------------------------------------------------------
mask_pairs = st.integers(2, 12).flatmap(lambda n: st.tuples(arrays(bool, (n, n)), arrays(bool, (n, n))))


@given(mask_pairs)
def test_properties_of_the_overlap_metrics(pair):
    a, b = pair
    ab, ba = M.image_metrics(a, b), M.image_metrics(b, a)
    for k in ("dice", "iou", "pixel_accuracy"):
        assert 0.0 <= ab[k] <= 1.0
        assert ab[k] == pytest.approx(ba[k])  # symmetric
    # precision and recall swap roles when prediction and truth swap.
    assert ab["precision"] == pytest.approx(ba["recall"])
    assert ab["dice"] == pytest.approx(2 * ab["iou"] / (1 + ab["iou"]))
    assert ab["iou"] <= ab["dice"]
    if not math.isnan(ab["hd95"]):
        assert ab["hd95"] == pytest.approx(ba["hd95"]) and ab["hd95"] >= 0
    assert math.isnan(ab["hd95"]) == (a.any() != b.any())
    # A mask against itself is perfect.
    self_row = M.image_metrics(a, a)
    assert (self_row["dice"], self_row["iou"], self_row["hd95"]) == (1.0, 1.0, 0.0)


# --------------------------------------------------------------------------------------
# 5. Probabilities, thresholds and resizing
# --------------------------------------------------------------------------------------
def test_sigmoid_and_threshold():
    x = np.asarray([-1e4, -2.0, 0.0, 2.0, 1e4], np.float32)
    with np.errstate(over="raise"):
        p = M.sigmoid(x)
    np.testing.assert_allclose(p, [0.0, 1 / (1 + np.e**2), 0.5, 1 / (1 + np.e**-2), 1.0], rtol=1e-6)
    np.testing.assert_array_equal(M.threshold(p), [False, False, False, True, True])  # p > 0.5
    np.testing.assert_array_equal(
        M.binarize(np.asarray([[0, 255], [1, 0]], np.uint8)[..., None]), [[False, True], [True, False]]
    )


def test_resize_mask_to_native_resolution():
    prob = np.full((8, 8), 0.2, np.float32)
    prob[2:6, 2:6] = 0.9
    up = M.resize_mask(prob, (32, 48), t=None)
    assert up.shape == (32, 48) and up.dtype == np.float32
    assert up.min() >= 0.2 - 1e-6 and up.max() <= 0.9 + 1e-6  # bilinear never overshoots
    mask = M.resize_mask(prob, (32, 48))
    assert mask.dtype == bool
    # The square covers the middle half of each axis: rows 8..23, cols 12..35, give or take
    # the interpolated edge.
    assert mask[16, 24] and not mask[2, 2]
    assert abs(int(mask.sum()) - 16 * 24) <= 2 * (16 + 24)
    # Same size: unchanged; a bool mask goes through as probabilities 0/1.
    np.testing.assert_array_equal(M.resize_mask(prob[..., None], (8, 8)), prob > 0.5)
    gt = square(16, 4, 4, 8)
    np.testing.assert_array_equal(M.resize_mask(M.resize_mask(gt, (64, 64)), (16, 16)), gt)
    with pytest.raises(ValueError, match="positive"):
        M.resize_mask(prob, (0, 4))


# --------------------------------------------------------------------------------------
# 6. Aggregation, bootstrap, normal false positives
# --------------------------------------------------------------------------------------
def test_bootstrap_ci_contains_the_mean_and_is_deterministic():
    values = np.random.default_rng(0).beta(5, 2, size=60)
    lo, hi = M.bootstrap_ci(values, n_boot=1000, seed=3)
    assert lo < values.mean() < hi
    assert (lo, hi) == M.bootstrap_ci(values, n_boot=1000, seed=3)
    assert (lo, hi) != M.bootstrap_ci(values, n_boot=1000, seed=4)
    # Roughly the normal-theory interval mean ± 1.96 s / sqrt(n).
    half = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
    assert (hi - lo) == pytest.approx(2 * half, rel=0.2)
    assert M.bootstrap_ci(np.full(5, 0.7)) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(v) for v in M.bootstrap_ci([]))


def test_summarize_excludes_nan_and_counts_them():
    s = M.summarize([1.0, 3.0, math.nan, 5.0], n_boot=200)
    assert (s["mean"], s["n"], s["n_excluded"]) == (3.0, 3, 1)
    assert s["std"] == pytest.approx(2.0)  # sample standard deviation
    assert s["ci_low"] <= 3.0 <= s["ci_high"]
    assert M.summarize([0.5])["std"] == 0.0
    empty = M.summarize([math.nan])
    assert math.isnan(empty["mean"]) and empty["n"] == 0 and empty["n_excluded"] == 1


def make_rows():
    """3 benign, 2 malignant, 4 normal images with known outcomes."""
    gt = square(10, 2, 2, 4)
    rows = []
    for cls, pred in [
        ("benign", gt),  # perfect
        ("benign", square(10, 4, 4, 4)),  # the 2-squares case: dice 0.25
        ("benign", EMPTY10),  # missed: dice 0, hd95 NaN
        ("malignant", gt),
        ("malignant", square(10, 2, 2, 4, h=2)),  # top half: dice 2*8/24
    ]:
        rows.append({"class": cls, "name": f"{cls}{len(rows)}", **M.image_metrics(pred, gt)})
    for pred in (EMPTY10, EMPTY10, EMPTY10, square(10, 0, 0, 1)):  # one false alarm
        rows.append({"class": "normal", **M.image_metrics(pred, EMPTY10)})
    return rows


EMPTY10 = np.zeros((10, 10), bool)


def test_aggregate_per_class_and_over_lesions():
    agg = M.aggregate(make_rows(), n_boot=200, seed=0)
    assert agg["counts"] == {"overall": 9, "lesion": 5, "benign": 3, "malignant": 2, "normal": 4}
    dice = agg["dice"]
    assert dice["benign"]["mean"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert dice["malignant"]["mean"] == pytest.approx((1 + 16 / 24) / 2)
    assert dice["lesion"]["mean"] == pytest.approx((1 + 0.25 + 0 + 1 + 16 / 24) / 5)
    assert dice["normal"]["mean"] == pytest.approx(3 / 4)
    assert dice["overall"]["mean"] == pytest.approx((1.25 + 1 + 16 / 24 + 3) / 9)
    for group, s in dice.items():
        assert s["ci_low"] <= s["mean"] <= s["ci_high"], group
    # HD95: the missed benign image and the normal false alarm are excluded, and counted.
    assert agg["hd95"]["benign"]["n"] == 2 and agg["hd95"]["benign"]["n_excluded"] == 1
    assert agg["hd95"]["normal"]["n"] == 3 and agg["hd95"]["normal"]["n_excluded"] == 1
    assert agg["hd95"]["normal"]["mean"] == 0.0


def test_normal_false_positive_rate_and_missed_lesions():
    agg = M.aggregate(make_rows(), n_boot=200)
    fp = agg["normal_false_positive_rate"]
    assert (fp["rate"], fp["count"], fp["n"]) == (0.25, 1, 4)
    # On normal images every overlap metric equals 1 - the false-positive rate.
    for k in ("dice", "iou", "precision", "recall"):
        assert agg[k]["normal"]["mean"] == pytest.approx(1 - fp["rate"])
    missed = agg["lesion_empty_prediction_rate"]
    assert (missed["rate"], missed["count"], missed["n"]) == (0.2, 1, 5)


@pytest.mark.parametrize(
    "k, n, expected",
    [(0, 20, (0.0, 0.161)), (1, 20, (0.009, 0.236)), (20, 20, (0.839, 1.0)), (1, 4, (0.046, 0.699))],
)
def test_rates_have_wilson_intervals_that_hold_at_0_of_n(k, n, expected):
    # Wilson score intervals (Newcombe 1998, Table I): 0/20 -> [0, 0.161], 1/20 -> [0.009, 0.236]
    assert M.wilson_ci(k, n) == pytest.approx(expected, abs=5e-4)
    rows = [{"class": "normal", "pred_area": int(i < k)} for i in range(n)]
    rows += [{"class": "benign", "pred_area": 0 if i < k else 5} for i in range(n)]
    agg = M.aggregate(rows, metrics=(), n_boot=200)
    for name in ("normal_false_positive_rate", "lesion_empty_prediction_rate"):
        r = agg[name]
        assert (r["count"], r["n"]) == (k, n)
        assert (r["ci_low"], r["ci_high"]) == pytest.approx(expected, abs=5e-4), name
    assert all(math.isnan(v) for v in M.wilson_ci(0, 0))
    lo, hi = expected
    assert f"normal_false_positive_rate: {k / n:.4f} ({k}/{n}) [Wilson 95% CI {lo:.3f}, {hi:.3f}]" in M.format_summary(
        agg, ()
    )


def test_the_distance_transform_is_scipys(monkeypatch):
    from scipy import ndimage

    calls = []
    real = ndimage.distance_transform_edt

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(ndimage, "distance_transform_edt", spy)
    a, b = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    a[5:15, 5:15], b[8:20, 6:18] = True, True
    assert M.hd95(a, b) == pytest.approx(brute_hd95(a, b))
    assert calls  # one home: scipy's exact transform, not a hand-written one


def test_aggregate_is_deterministic_and_json_ready():
    rows = make_rows()
    a, b = M.aggregate(rows, n_boot=200, seed=7), M.aggregate(rows, n_boot=200, seed=7)
    assert json.dumps(M.to_jsonable(a)) == json.dumps(M.to_jsonable(b))  # NaN != NaN, so via JSON
    text = json.dumps(M.to_jsonable(a), allow_nan=False)  # NaNs became null
    assert '"normal_false_positive_rate"' in text
    no_normals = M.aggregate([r for r in rows if r["class"] != "normal"], n_boot=50)
    assert math.isnan(no_normals["normal_false_positive_rate"]["rate"])
    assert no_normals["dice"]["normal"]["n"] == 0
    table = M.format_summary(a)
    assert "dice" in table and "lesion (n=5)" in table and "normal_false_positive_rate: 0.2500 (1/4)" in table
