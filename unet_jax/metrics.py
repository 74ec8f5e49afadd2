"""Per-image segmentation metrics, their aggregation, and the empty-mask conventions.

Host-side NumPy: evaluation runs one image at a time at its native resolution (the
prediction is brought back with :func:`resize_mask`). Masks are boolean ``(H, W)``:
``A`` the prediction, ``B`` the ground truth, with pixel counts
``tp = |A ∩ B|``, ``fp = |A \\ B|``, ``fn = |B \\ A|``, ``tn`` the rest::

    Dice            2|A ∩ B| / (|A| + |B|)      = 2 tp / (2 tp + fp + fn)
    IoU             |A ∩ B| / |A ∪ B|           = tp / (tp + fp + fn)          (the report's definition)
    pixel accuracy  (tp + tn) / (H W)           (what the notebook's Keras "accuracy" measured)
    precision       tp / (tp + fp)
    recall          tp / (tp + fn)
    HD95            max(P95 d(∂A -> ∂B), P95 d(∂B -> ∂A))   in pixels (Euclidean)

Empty masks: the one convention
-------------------------------
A ratio whose denominator is 0 is **1 when both masks are empty** (the prediction is
exactly right: a normal image predicted empty) **and 0 otherwise** (a missed lesion or a
false alarm is a failure and never scores a perfect value). Distances between an empty
and a non-empty mask do not exist: HD95 is NaN there, and NaNs are left out of means with
the number left out reported (``n_excluded``).

=========================  ======  =====  =========  ======  ========  =====
case (prediction A, gt B)   Dice    IoU   precision  recall  pixel acc  HD95
=========================  ======  =====  =========  ======  ========  =====
A = ∅, B = ∅ (correct)        1      1        1         1       1        0
A ≠ ∅, B = ∅ (false alarm)    0      0        0         0     formula   NaN
A = ∅, B ≠ ∅ (missed)         0      0        0         0     formula   NaN
A ≠ ∅, B ≠ ∅                formula formula formula  formula  formula  formula
=========================  ======  =====  =========  ======  ========  =====

(In the false-alarm row precision is ``0 / fp = 0`` by the formula; recall is ``0/0``;
in the missed row recall is ``0 / fn = 0`` and precision ``0/0``.) A consequence worth
knowing: on normal images Dice, IoU, precision and recall all equal ``1 - normal false
positive rate``.

How this compares: Dice and IoU follow MONAI's ``DiceMetric(ignore_empty=False)`` /
``MeanIoU(ignore_empty=False)`` (1 if both empty, else the formula, which gives 0).
MONAI's default ``ignore_empty=True`` and nnU-Net instead return NaN when the ground truth
is empty (nnU-Net: when ``tp + fp + fn = 0``) and drop those images; we keep them, because
predicting nothing on a normal image is the correct answer and a model must earn it.
For precision/recall MONAI's confusion-matrix metrics return NaN on ``0/0`` and
scikit-learn 0 (with a warning); ours is 0 except in the both-empty case. HD95 follows
MONAI's ``HausdorffDistanceMetric(percentile=95, directed=False)``: boundaries are the
foreground pixels with a 4-neighbour outside the mask (outside the image counts as
outside), distances run boundary to boundary, and the symmetric value is the larger of the
two directed 95th percentiles (NumPy's linear interpolation). MONAI warns and returns
inf/NaN when one mask is empty; we return NaN, and 0 when both are empty.

The distance transform is exact Euclidean (``scipy.ndimage.distance_transform_edt``), on
the bounding box of both masks only. Means get percentile-bootstrap intervals
(:func:`bootstrap_ci`); rates (a count of n images) get Wilson score intervals
(:func:`wilson_ci`), which hold at 0 of n and n of n, where a bootstrap collapses to a point.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "roc_auc",
    "classification_metrics",
    "METRICS",
    "CLASSES",
    "LESION_CLASSES",
    "sigmoid",
    "threshold",
    "binarize",
    "resize_mask",
    "confusion",
    "scores_from_confusion",
    "boundary",
    "squared_edt",
    "surface_distances",
    "hd95",
    "dice",
    "iou",
    "pixel_accuracy",
    "precision",
    "recall",
    "image_metrics",
    "bootstrap_ci",
    "wilson_ci",
    "rate_summary",
    "summarize",
    "aggregate",
    "format_summary",
    "format_rate",
    "rate_cell",
    "to_jsonable",
]

# The per-image metrics, in report order.
METRICS: tuple[str, ...] = ("dice", "iou", "pixel_accuracy", "precision", "recall", "hd95")
CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")
LESION_CLASSES: tuple[str, ...] = ("benign", "malignant")


# --------------------------------------------------------------------------------------
# Probabilities, thresholds, resizing
# --------------------------------------------------------------------------------------
def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable ``1 / (1 + e^-x)`` in float32 (no overflow warning for large ``|x|``)."""
    x = np.asarray(logits, np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def threshold(prob: np.ndarray, t: float = 0.5) -> np.ndarray:
    """Boolean mask ``prob > t``: the one thresholding rule of the project (the same as
    :func:`unet_jax.losses.batch_confusion`)."""
    return np.asarray(prob) > t


def binarize(mask: np.ndarray) -> np.ndarray:
    """A ground-truth mask of any integer/bool/float encoding ({0,1}, {0,255}) as bool ``mask > 0``,
    with a trailing channel axis of 1 dropped."""
    return _as_2d(np.asarray(mask), "mask") > 0


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be (H, W) or (H, W, 1), got shape {a.shape}")
    return a


def resize_mask(mask_or_prob: np.ndarray, size: tuple[int, int], t: float | None = 0.5) -> np.ndarray:
    """Resize a probability map (or a mask) to ``size = (height, width)``.

    Bilinear interpolation of the *probabilities* (PIL, float32 ``'F'`` images: pixel
    centres aligned as ``align_corners=False``, with a widened filter when shrinking so
    no pixel is skipped), then ``> t``. Interpolating probabilities and thresholding
    afterwards gives smooth, sub-pixel-placed boundaries; resizing an already thresholded
    mask with nearest neighbour would give blocky ones. A boolean/integer mask is treated
    as probabilities 0/1 (``mask > 0``), so the result is the mask resized with a smooth
    boundary. ``t=None`` returns the resized float32 probabilities instead of a mask.

    ``(h, w)`` or ``(h, w, 1)`` in, ``(height, width)`` out (bool, or float32 if ``t`` is None).
    """
    a = _as_2d(np.asarray(mask_or_prob), "mask_or_prob")
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        a = a > 0
    a = a.astype(np.float32)
    height, width = int(size[0]), int(size[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive (height, width), got {size}")
    if a.shape != (height, width):
        image = Image.fromarray(np.ascontiguousarray(a))  # float32 (H, W) -> mode 'F'
        a = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))
    return a if t is None else a > t


# --------------------------------------------------------------------------------------
# Confusion counts and the empty-mask convention (NumPy or jax arrays)
# --------------------------------------------------------------------------------------
def confusion(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int, int]:
    """``(tp, fp, fn, tn)`` pixel counts of two boolean ``(H, W)`` masks."""
    pred, gt = _pair(pred, gt)
    tp = int(np.count_nonzero(pred & gt))
    fp = int(np.count_nonzero(pred & ~gt))
    fn = int(np.count_nonzero(~pred & gt))
    return tp, fp, fn, pred.size - tp - fp - fn


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = _as_2d(np.asarray(pred), "pred").astype(bool)
    gt = _as_2d(np.asarray(gt), "gt").astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction {pred.shape} and ground truth {gt.shape} differ in size; bring the "
            "prediction to the mask's resolution first (resize_mask)"
        )
    return pred, gt


def scores_from_confusion(tp: Any, fp: Any, fn: Any, tn: Any) -> dict[str, Any]:
    """Dice, IoU, pixel accuracy, precision and recall from counts, with the module's
    empty-mask convention (``0/0`` is 1 when both masks are empty, else 0).

    Works elementwise on Python numbers, NumPy arrays and jax arrays (also under
    ``jax.jit``, e.g. on the ``(N,)`` counts of :func:`unet_jax.losses.batch_confusion`),
    returning the same kind: one place for the rule, on host and on device.
    """
    xp = _array_module(tp, fp, fn, tn)
    tp, fp, fn, tn = (xp.asarray(v, dtype=xp.float64 if xp is np else xp.float32) for v in (tp, fp, fn, tn))
    both_empty = (tp + fp + fn) == 0
    empty_value = xp.where(both_empty, 1.0, 0.0)

    def ratio(num: Any, den: Any) -> Any:
        # where() evaluates both branches: divide by max(den, 1) so 0/0 never warns.
        return xp.where(den > 0, num / xp.maximum(den, 1.0), empty_value)

    out = {
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "iou": ratio(tp, tp + fp + fn),
        "pixel_accuracy": ratio(tp + tn, tp + fp + fn + tn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }
    if xp is np and all(np.ndim(v) == 0 for v in out.values()):
        return {k: float(v) for k, v in out.items()}
    return out


def _array_module(*values: Any) -> Any:
    """``jax.numpy`` if any value is a jax array (tracers included), else NumPy. Looks jax up
    in ``sys.modules``: if it was never imported, nothing can be a jax array."""
    jax = sys.modules.get("jax")
    if jax is not None and any(isinstance(v, jax.Array) for v in values):
        return jax.numpy
    return np


# --------------------------------------------------------------------------------------
# Boundaries and exact Euclidean distance transform
# --------------------------------------------------------------------------------------
def boundary(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with at least one 4-neighbour outside the mask (the image border
    counts as outside): ``mask & ~erosion(mask)``, as MONAI's ``get_mask_edges``."""
    m = np.asarray(mask, bool)
    interior = np.zeros_like(m)
    interior[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return m & ~interior


def squared_edt(features: np.ndarray) -> np.ndarray:
    """Exact squared Euclidean distance from every pixel to the nearest ``True`` pixel of
    ``features`` (2-D bool), as float64 (``scipy.ndimage.distance_transform_edt``). With no
    feature anywhere in the image, every pixel gets a value larger than any real squared
    distance (``> H^2 + W^2``)."""
    f = np.asarray(features, bool)
    h, w = f.shape
    if not f.any():
        return np.full(f.shape, float(4 * (h * h + w * w) + 1))
    from scipy import ndimage  # deferred: the CLI imports this module at start-up (0.2 s)

    return np.rint(np.square(ndimage.distance_transform_edt(~f)))  # integers: undo sqrt's rounding


def surface_distances(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances (pixels) from each boundary pixel of ``pred`` to the nearest boundary pixel
    of ``gt``, and from ``gt``'s to ``pred``'s. Both masks must be non-empty.

    Computed on the bounding box of both masks: every boundary pixel lies inside it, and
    a distance between two pixels does not depend on the rest of the image.
    """
    pred, gt = _pair(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    ys, xs = np.nonzero(pred | gt)
    box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    # Boundaries on the full image: cropping first would turn crop edges into borders.
    bp, bg = boundary(pred)[box], boundary(gt)[box]
    d_pg = np.sqrt(squared_edt(bg)[bp])
    d_gp = np.sqrt(squared_edt(bp)[bg])
    return d_pg, d_gp


def hd95(pred: np.ndarray, gt: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance in pixels:
    ``max(P95 d(∂A -> ∂B), P95 d(∂B -> ∂A))``; 0 if both masks are empty, NaN if exactly
    one is (see the module's convention table)."""
    pred, gt = _pair(pred, gt)
    a, b = pred.any(), gt.any()
    if not a and not b:
        return 0.0
    if a != b:
        return math.nan
    d_pg, d_gp = surface_distances(pred, gt)
    return float(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)))


# --------------------------------------------------------------------------------------
# Per-image metrics
# --------------------------------------------------------------------------------------
def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """``2|A ∩ B| / (|A| + |B|)``; 1 if both empty."""
    return scores_from_confusion(*confusion(pred, gt))["dice"]


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """``|A ∩ B| / |A ∪ B|`` (the report's IoU); 1 if both empty."""
    return scores_from_confusion(*confusion(pred, gt))["iou"]


def pixel_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    """Share of pixels classified correctly, ``(tp + tn) / (H W)``."""
    return scores_from_confusion(*confusion(pred, gt))["pixel_accuracy"]


def precision(pred: np.ndarray, gt: np.ndarray) -> float:
    """``tp / (tp + fp)``; 1 if both empty, 0 if only the prediction is."""
    return scores_from_confusion(*confusion(pred, gt))["precision"]


def recall(pred: np.ndarray, gt: np.ndarray) -> float:
    """``tp / (tp + fn)``; 1 if both empty, 0 if only the ground truth is."""
    return scores_from_confusion(*confusion(pred, gt))["recall"]


def image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float | int]:
    """All metrics of one image: the :data:`METRICS` as floats, plus the counts
    ``tp, fp, fn, tn``, ``pred_area`` and ``gt_area`` (ints) for aggregation.

    ``pred`` and ``gt`` are boolean (or {0,1}) ``(H, W)`` / ``(H, W, 1)`` masks of one size.
    """
    pred, gt = _pair(pred, gt)
    tp, fp, fn, tn = confusion(pred, gt)
    row: dict[str, float | int] = dict(scores_from_confusion(tp, fp, fn, tn))
    row["hd95"] = hd95(pred, gt)
    row.update(tp=tp, fp=fp, fn=fn, tn=tn, pred_area=tp + fp, gt_area=tp + fn)
    return row


# --------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------
def bootstrap_ci(
    values: np.ndarray, n_boot: int = 1000, seed: int | Sequence[int] = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean: resample the values with
    replacement ``n_boot`` times (all at once, an ``(n_boot, n)`` index array), and take
    the ``(1 - level)/2`` and ``(1 + level)/2`` quantiles of the resampled means.
    Deterministic for a seed; ``(nan, nan)`` for no values or ``n_boot = 0`` (means only)."""
    x = np.asarray(values, np.float64)
    if x.size == 0 or n_boot == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def wilson_ci(count: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``count`` of ``n``
    (``scipy.stats.binomtest(count, n).proportion_ci("wilson")``): 0 of 20 gives
    [0, 0.161], 1 of 20 [0.009, 0.236]. ``(nan, nan)`` when ``n`` is 0."""
    if n == 0:
        return math.nan, math.nan
    from scipy import stats  # deferred: the CLI imports this module at start-up (0.5 s)

    ci = stats.binomtest(int(count), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def rate_summary(flags: Iterable[bool], level: float = 0.95) -> dict[str, float | int]:
    """``rate``, ``count``, ``n`` and the Wilson ``ci_low`` / ``ci_high`` of boolean flags
    (rate NaN when there are none)."""
    values = [bool(f) for f in flags]
    count, n = sum(values), len(values)
    lo, hi = wilson_ci(count, n, level)
    return {"rate": count / n if n else math.nan, "count": count, "n": n, "ci_low": lo, "ci_high": hi}


def summarize(
    values: Iterable[float], n_boot: int = 1000, seed: int | Sequence[int] = 0, level: float = 0.95
) -> dict[str, float | int]:
    """``mean``, ``std`` (sample, ``ddof=1``; 0 for one value), bootstrap ``ci_low`` /
    ``ci_high``, ``n`` (values used) and ``n_excluded`` (NaNs left out) of one metric."""
    x = np.asarray(list(values), np.float64)
    finite = x[~np.isnan(x)]
    n = int(finite.size)
    lo, hi = bootstrap_ci(finite, n_boot=n_boot, seed=seed, level=level)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "std": float(finite.std(ddof=1)) if n > 1 else (0.0 if n == 1 else math.nan),
        "ci_low": lo,
        "ci_high": hi,
        "n": n,
        "n_excluded": int(x.size - n),
    }


def aggregate(
    rows: Sequence[Mapping[str, Any]],
    classes: Sequence[str] = CLASSES,
    lesion_classes: Sequence[str] = LESION_CLASSES,
    normal_class: str = "normal",
    metrics: Sequence[str] = METRICS,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Aggregate per-image rows (from :func:`image_metrics`, each with a ``"class"`` key).

    Groups: ``"overall"`` (every row), ``"lesion"`` (rows whose class is in
    ``lesion_classes``) and one per class in ``classes``. Returns::

        {metric: {group: summarize(...)} for metric in metrics,
         "normal_false_positive_rate": {"rate", "count", "n", "ci_low", "ci_high"},
         "lesion_empty_prediction_rate": {"rate", "count", "n", "ci_low", "ci_high"},
         "counts": {group: number of images}}

    ``normal_false_positive_rate`` is the share of ``normal_class`` images with at least one
    predicted positive pixel; ``lesion_empty_prediction_rate`` the share of lesion images
    predicted entirely empty (missed); their intervals are Wilson's (:func:`rate_summary`).
    Rates are NaN with ``n = 0`` when the group is absent. Every (metric, group) bootstrap
    has its own seeded stream, so adding a metric does not change the others' intervals.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {"overall": list(rows)}
    groups["lesion"] = [r for r in rows if r.get("class") in lesion_classes]
    for c in classes:
        groups[c] = [r for r in rows if r.get("class") == c]

    out: dict[str, Any] = {}
    for mi, metric in enumerate(metrics):
        out[metric] = {
            g: summarize([r[metric] for r in members], n_boot=n_boot, seed=(seed, mi, gi), level=level)
            for gi, (g, members) in enumerate(groups.items())
        }

    normal = [r for r in rows if r.get("class") == normal_class]
    out["normal_false_positive_rate"] = rate_summary([_pred_area(r) > 0 for r in normal], level)
    out["lesion_empty_prediction_rate"] = rate_summary([_pred_area(r) == 0 for r in groups["lesion"]], level)
    out["counts"] = {g: len(members) for g, members in groups.items()}
    return out


def _pred_area(row: Mapping[str, Any]) -> int:
    if "pred_area" in row:
        return int(row["pred_area"])
    if "tp" in row and "fp" in row:
        return int(row["tp"]) + int(row["fp"])
    raise KeyError("row needs 'pred_area' (or 'tp' and 'fp'), as image_metrics() returns")


def format_summary(agg: Mapping[str, Any], metrics: Sequence[str] = METRICS, digits: int = 4) -> str:
    """A plain-text table of :func:`aggregate`'s result: one line per metric, one column
    per group, ``mean [ci_low, ci_high]``; then the two rates with their Wilson intervals.
    For logs and the CLI."""
    groups = list(agg["counts"])
    header = ["metric"] + [f"{g} (n={agg['counts'][g]})" for g in groups]
    lines = [header]
    for m in metrics:
        if m not in agg:
            continue
        cells = [m]
        for g in groups:
            s = agg[m][g]
            cells.append(
                "-" if s["n"] == 0 else f"{s['mean']:.{digits}f} [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]"
            )
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    for key in ("normal_false_positive_rate", "lesion_empty_prediction_rate"):
        r = agg.get(key)
        if r is not None and r["n"]:
            text.append(f"{key}: {format_rate(r, digits)}")
    return "\n".join(text)


def format_rate(r: Mapping[str, Any], digits: int = 4) -> str:
    """A rate of :func:`rate_summary` for logs and the console:
    ``rate (count/n) [Wilson 95% CI low, high]``; "n/a" when ``n`` is 0. The interval is
    recomputed from the counts (a stored result may predate Wilson intervals)."""
    if not r.get("n"):
        return "n/a"
    lo, hi = wilson_ci(r["count"], r["n"])
    return f"{r['rate']:.{digits}f} ({r['count']}/{r['n']}) [Wilson 95% CI {lo:.3f}, {hi:.3f}]"


def rate_cell(summary: Mapping[str, Any] | None, rate: float, digits: int = 3) -> str:
    """A table's rate cell: ``rate [Wilson 95% CI]`` from ``summary``'s count and n (a
    :func:`rate_summary`), or the rate alone when there is no summary (a stored result from
    before the counts were kept)."""
    if not summary or not summary.get("n"):
        return f"{rate:.{digits}f}"
    lo, hi = wilson_ci(summary["count"], summary["n"])
    return f"{rate:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def to_jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by ``None`` and NumPy scalars by Python ones,
    so that ``json.dumps(..., allow_nan=False)`` accepts it (strict JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# --------------------------------------------------------------------------------------
# Image classification (benign / malignant / normal)
# --------------------------------------------------------------------------------------
def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic on
    ``scipy.stats.rankdata``'s average ranks (ties count one half).

    ``scores`` (N,) real, ``positive`` (N,) bool. NaN when either class is absent (the
    area is undefined, not 0.5).
    """
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy import stats  # deferred: the CLI imports this module at start-up (0.5 s)

    ranks = stats.rankdata(scores)  # average ranks over ties (1-based)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, classes: Sequence[str] = CLASSES, positive_class: str = "malignant"
) -> dict[str, Any]:
    """Image-level metrics of class probabilities ``probs`` (N, K) against ``labels`` (N,).

    Returns ``accuracy`` (argmax), ``loss`` (mean cross-entropy, the report's "loss"
    column for its classifier rows), ``per_class_recall`` (NaN for a class with no
    image), ``confusion_matrix`` (rows: true class, columns: predicted), and
    ``{positive_class}_vs_rest_auc`` (ROC AUC of ``probs[:, positive]``), with ``n``.
    """
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or probs.shape[1] != len(classes):
        raise ValueError(
            f"classification_metrics: probs (N, {len(classes)}) and labels (N,) expected, "
            f"got {probs.shape} and {labels.shape}"
        )
    predicted = probs.argmax(axis=1)
    k = len(classes)
    matrix = np.zeros((k, k), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    recall = {
        c: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else float("nan")) for i, c in enumerate(classes)
    }
    picked = probs[np.arange(len(labels)), labels]
    positive = classes.index(positive_class)
    return {
        "n": int(len(labels)),
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else float("nan"),
        "loss": float(np.mean(-np.log(np.clip(picked, 1e-12, 1.0)))) if len(labels) else float("nan"),
        "per_class_recall": recall,
        "confusion_matrix": matrix.tolist(),
        "classes": list(classes),
        f"{positive_class}_vs_rest_auc": roc_auc(probs[:, positive], labels == positive),
    }
