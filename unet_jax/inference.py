"""The inference recipe: what turns a model's probability map into the mask a user gets.

A trained segmenter gives per-pixel lesion probabilities at its training size. Between
those and the final native-resolution mask sit decisions that are tuned on validation
data, never on a test split, and then travel with the checkpoint (``inference.json``), so
that ``evaluate`` and ``predict`` apply them the same way:

1. flip test-time augmentation (average with the mirrored image's prediction);
2. the "no lesion here" gate: an image-level decision that predicts an empty mask when
   the class head's normal probability, the maximum pixel probability, or the predicted
   area says so (normal images are 17% of BUSI; a segmenter alone marks most of them);
3. connected components at the model's resolution (8-connectivity): keep the largest, or
   drop those below a fraction of the image; fill holes;
4. the decision threshold, applied after bilinear resizing to the native size
   (unet_jax.metrics.resize_mask).

:func:`tune_recipe` searches these levers on validation predictions and reports each
lever's effect (the ablation rows); the objective is the mean per-image Dice over all
validation images under the project's empty-mask convention (a normal image scores 1 when
predicted empty, 0 when marked), subject to at most ``max_lesion_empty`` of the lesion
images predicted empty.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from unet_jax import metrics as M

__all__ = ["InferenceRecipe", "RAW", "connected_components", "fill_holes", "select_components", "gate_score",
           "recipe_mask", "refine_probabilities", "tune_recipe", "NORMAL_CLASS"]

NORMAL_CLASS = 2  # index of "normal" in (benign, malignant, normal)
GATES = ("none", "class", "max_prob", "area")
COMPONENTS = ("all", "largest")


@dataclasses.dataclass(frozen=True)
class InferenceRecipe:
    """How probabilities become a mask (see the module docstring).

    threshold: probability above which a pixel is lesion, in (0, 1).
    flip_tta: average with the horizontally mirrored image's prediction.
    gate: "none"; "class" (empty when the class head's p(normal) >= gate_threshold);
      "max_prob" (empty when no pixel reaches gate_threshold); "area" (empty when the
      predicted area is below gate_threshold, a fraction of the image).
    components: "all", or "largest" (keep the largest 8-connected component).
    min_component_fraction: drop components smaller than this fraction of the image.
    fill_holes: fill background regions enclosed by the lesion.
    tuned_on: where the recipe was chosen (provenance only).
    """

    threshold: float = 0.5
    flip_tta: bool = False
    gate: Literal["none", "class", "max_prob", "area"] = "none"
    gate_threshold: float = 0.0
    components: Literal["all", "largest"] = "all"
    min_component_fraction: float = 0.0
    fill_holes: bool = False
    tuned_on: str | None = None

    def __post_init__(self) -> None:
        checks = [
            ("threshold", isinstance(self.threshold, (int, float)) and 0 < self.threshold < 1, "in (0, 1)"),
            ("flip_tta", isinstance(self.flip_tta, bool), "true or false"),
            ("gate", self.gate in GATES, f"one of {list(GATES)}"),
            ("gate_threshold", isinstance(self.gate_threshold, (int, float)) and 0 <= self.gate_threshold <= 1,
             "a number in [0, 1]"),
            ("components", self.components in COMPONENTS, f"one of {list(COMPONENTS)}"),
            ("min_component_fraction", isinstance(self.min_component_fraction, (int, float))
             and 0 <= self.min_component_fraction < 1, "a fraction in [0, 1)"),
            ("fill_holes", isinstance(self.fill_holes, bool), "true or false"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"inference recipe {name} = {getattr(self, name)!r}: expected {expected}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "inference recipe") -> InferenceRecipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)

    def describe(self) -> str:
        parts = [f"threshold {self.threshold:g}"]
        if self.flip_tta:
            parts.append("flip TTA")
        if self.gate != "none":
            parts.append(f"gate {self.gate} {self.gate_threshold:g}")
        if self.components == "largest":
            parts.append("largest component")
        if self.min_component_fraction:
            parts.append(f"components >= {self.min_component_fraction:.2%}")
        if self.fill_holes:
            parts.append("holes filled")
        return ", ".join(parts)


RAW = InferenceRecipe()  # the model's own output at 0.5: what `--raw` shows


# --------------------------------------------------------------------------------------
# Binary morphology at the model's resolution (NumPy, no SciPy at run time)
# --------------------------------------------------------------------------------------
def _neighbour_max(a: np.ndarray) -> np.ndarray:
    """Max over each pixel's 3x3 neighbourhood (8-connectivity), edges padded with 0."""
    p = np.pad(a, 1)
    h, w = a.shape
    out = a.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            np.maximum(out, p[dy:dy + h, dx:dx + w], out=out)
    return out


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D boolean mask: ``(labels (H, W) int32, count)``,
    labels 1..count by first pixel in raster order, 0 for background.

    Label propagation: every foreground pixel starts with its own index and repeatedly
    takes the largest index in its 3x3 neighbourhood until nothing changes (at most the
    component's diameter in iterations; fine at a model's 128-256 pixel side).
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"connected_components expects a 2-D mask, got shape {mask.shape}")
    if not mask.any():
        return np.zeros(mask.shape, np.int32), 0
    labels = np.where(mask, np.arange(1, mask.size + 1, dtype=np.int64).reshape(mask.shape), 0)
    while True:
        grown = np.where(mask, _neighbour_max(labels), 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    roots, first = np.unique(labels[mask], return_index=True)
    order = np.argsort(np.flatnonzero(mask.ravel())[first])  # raster order of each component's first pixel
    relabel = np.zeros(int(labels.max()) + 1, np.int32)
    relabel[roots[order]] = np.arange(1, len(roots) + 1, dtype=np.int32)
    return relabel[labels], len(roots)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the border filled
    (4-connected background, the complement of 8-connected foreground)."""
    mask = np.asarray(mask, bool)
    background = ~mask
    reach = np.zeros_like(mask)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = (background[0, :], background[-1, :],
                                                            background[:, 0], background[:, -1])
    while True:
        p = np.pad(reach, 1)
        grown = background & (reach | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:])
        if np.array_equal(grown, reach):
            return ~reach
        reach = grown


def select_components(mask: np.ndarray, recipe: InferenceRecipe) -> np.ndarray:
    """The components of ``mask`` the recipe keeps (largest, or those above the area floor)."""
    mask = np.asarray(mask, bool)
    if recipe.components == "all" and recipe.min_component_fraction == 0:
        return mask
    labels, n = connected_components(mask)
    if n == 0:
        return mask
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    keep = areas >= recipe.min_component_fraction * mask.size
    if recipe.components == "largest":
        keep &= np.arange(n) == int(np.argmax(areas))
    return np.concatenate([[False], keep])[labels]


# --------------------------------------------------------------------------------------
# Applying a recipe
# --------------------------------------------------------------------------------------
def gate_score(gate: str, prob: np.ndarray, class_prob: np.ndarray | None, threshold: float) -> float:
    """The image-level score a gate compares with its threshold (higher = more lesion-like
    for max_prob and area; for "class" the normal probability, higher = more normal)."""
    if gate == "class":
        if class_prob is None:
            raise ValueError("inference recipe gate = 'class' needs a model with a class head "
                             "(model.class_head=3); expected gate 'none', 'max_prob' or 'area'")
        return float(class_prob[NORMAL_CLASS])
    if gate == "max_prob":
        return float(np.max(prob))
    if gate == "area":
        return float(np.mean(prob > threshold))
    return 0.0


def _gated(recipe: InferenceRecipe, prob: np.ndarray, class_prob: np.ndarray | None) -> bool:
    if recipe.gate == "none":
        return False
    score = gate_score(recipe.gate, prob, class_prob, recipe.threshold)
    return score >= recipe.gate_threshold if recipe.gate == "class" else score < recipe.gate_threshold


def refine_probabilities(prob: np.ndarray, recipe: InferenceRecipe) -> np.ndarray:
    """Component selection and hole filling on the model-resolution probabilities.

    Dropped components are zeroed beyond a one-pixel ring (kept so that bilinear resizing
    still sees the sub-threshold values at the kept lesion's edge); holes are set to 1.
    """
    binary = prob > recipe.threshold
    kept = select_components(binary, recipe)
    out = prob
    if kept is not binary:
        ring = _neighbour_max(kept.astype(np.uint8)).astype(bool)
        out = np.where(ring, prob, 0.0).astype(np.float32)
    if recipe.fill_holes:
        filled = fill_holes(kept)
        out = np.where(filled & ~kept, 1.0, out).astype(np.float32)
    return out


def recipe_mask(prob: np.ndarray, class_prob: np.ndarray | None, recipe: InferenceRecipe,
                size: tuple[int, int]) -> np.ndarray:
    """The final boolean mask (size = (height, width)) of one image's model-resolution
    probabilities ``prob`` (H, W) (flip-averaged already when the recipe says so) and
    class probabilities (K,) or None."""
    if _gated(recipe, prob, class_prob):
        return np.zeros(tuple(size), bool)
    return M.resize_mask(refine_probabilities(np.asarray(prob, np.float32), recipe), size, t=recipe.threshold)


# --------------------------------------------------------------------------------------
# Tuning on validation data
# --------------------------------------------------------------------------------------
def _objective(dice: np.ndarray, empty: np.ndarray, is_lesion: np.ndarray, max_lesion_empty: float) -> float:
    lesion_empty = float(np.mean(empty[is_lesion])) if is_lesion.any() else 0.0
    if lesion_empty > max_lesion_empty + 1e-9:
        return -np.inf
    return float(np.mean(dice))


def _scores(dice: np.ndarray, empty: np.ndarray, is_lesion: np.ndarray) -> dict[str, float]:
    normal = ~is_lesion
    return {
        "dice_all": float(np.mean(dice)),
        "lesion_dice": float(np.mean(dice[is_lesion])) if is_lesion.any() else float("nan"),
        "normal_false_positive_rate": float(np.mean(~empty[normal])) if normal.any() else float("nan"),
        "lesion_empty_rate": float(np.mean(empty[is_lesion])) if is_lesion.any() else float("nan"),
    }


def tune_recipe(probs: np.ndarray, probs_flip: np.ndarray | None, class_probs: np.ndarray | None,
                gts: Sequence[np.ndarray], *, thresholds: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7),
                max_lesion_empty: float = 0.05, tuned_on: str = "validation split",
                progress: Callable[[int, int], None] | None = None) -> tuple[InferenceRecipe, dict[str, Any]]:
    """Choose the recipe on validation predictions; returns ``(recipe, report)``.

    probs, probs_flip: (N, h, w) model-resolution probabilities without / with flip TTA
    (None: TTA not considered); class_probs (N, K) or None; gts: N native boolean masks
    (an all-zero mask is a normal image). The report holds the chosen recipe's validation
    scores, the raw model's, and one row per lever added alone to the raw model (the
    ablation rows), each with lesion Dice, normal false-positive rate and lesion empty rate.
    """
    n = len(gts)
    if n == 0 or probs.shape[0] != n:
        raise ValueError(f"tune_recipe: {probs.shape[0]} probability maps for {n} masks; expected as many, >= 1")
    is_lesion = np.array([np.asarray(g).any() for g in gts])
    pixels = np.array([np.asarray(g).size for g in gts], np.float64)
    variants = {False: probs} if probs_flip is None else {False: probs, True: 0.5 * (probs + probs_flip)}
    shapes = [("all", 0.0, False), ("largest", 0.0, False), ("all", 0.01, False),  # (components, floor, fill)
              ("all", 0.0, True), ("largest", 0.0, True)]
    combos = list(itertools.product(variants, thresholds, shapes))
    table: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for k, (flip, t, (comp, floor, fill)) in enumerate(combos):
        recipe = InferenceRecipe(threshold=t, flip_tta=flip, components=comp, min_component_fraction=floor,
                                 fill_holes=fill)
        dice, iou, empty, area = (np.zeros(n), np.zeros(n), np.zeros(n, bool), np.zeros(n))
        for i in range(n):
            mask = recipe_mask(variants[flip][i], None, recipe, np.asarray(gts[i]).shape)
            gt = np.asarray(gts[i], bool)
            dice[i], iou[i] = M.dice(mask, gt), M.iou(mask, gt)
            empty[i] = not mask.any()
            area[i] = mask.sum() / pixels[i]
        table[(flip, t, comp, floor, fill)] = (dice, iou, empty, area)
        if progress is not None:
            progress(k + 1, len(combos))

    # Order matters on ties (the earlier option is kept). A class head was trained to tell
    # normal images from lesion images, so its gate comes first: it stays on unless the
    # validation images say it costs Dice (a validation split holds few normal images, and a
    # segmenter that happens to leave them empty there is no evidence it will elsewhere).
    # Then no gate, then the hand-made rules.
    gate_options: list[tuple[str, float]] = []
    if class_probs is not None:
        gate_options += [("class", g) for g in (0.5, 0.4, 0.6, 0.3, 0.7, 0.8, 0.9)]
    gate_options += [("none", 0.0)]
    gate_options += [("max_prob", g) for g in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)]
    gate_options += [("area", g) for g in (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03)]

    def gated_scores(key: tuple, gate: str, g: float) -> tuple[np.ndarray, np.ndarray]:
        dice, _, empty, area = table[key]
        flip = key[0]
        if gate == "none":
            return dice, empty
        if gate == "class":
            off = class_probs[:, NORMAL_CLASS] >= g
        elif gate == "max_prob":
            off = variants[flip].reshape(n, -1).max(axis=1) < g
        else:
            off = area < g
        return np.where(off, (~is_lesion).astype(np.float64), dice), empty | off

    best, best_value = None, -np.inf
    for key in table:
        for gate, g in gate_options:
            dice, empty = gated_scores(key, gate, g)
            value = _objective(dice, empty, is_lesion, max_lesion_empty)
            if value > best_value + 1e-12:  # ties keep the earlier (simpler) option
                best, best_value = (key, gate, g), value
    if best is None:  # even the raw model leaves too many lesions empty: keep it, say so
        best = ((False, 0.5 if 0.5 in thresholds else thresholds[0], "all", 0.0, False), "none", 0.0)
    (flip, t, comp, floor, fill), gate, g = best
    recipe = InferenceRecipe(threshold=t, flip_tta=flip, gate=gate, gate_threshold=g, components=comp,
                             min_component_fraction=floor, fill_holes=fill, tuned_on=tuned_on)

    raw_key = (False, 0.5 if 0.5 in thresholds else thresholds[0], "all", 0.0, False)
    report: dict[str, Any] = {"images": n, "lesion_images": int(is_lesion.sum()),
                              "max_lesion_empty": max_lesion_empty, "recipe": recipe.to_dict(),
                              "chosen": _scores(*gated_scores(best[0], gate, g), is_lesion),
                              "raw": _scores(*gated_scores(raw_key, "none", 0.0), is_lesion)}
    levers: dict[str, dict[str, float]] = {}

    def lever(name: str, key: tuple, gate_name: str = "none", gate_value: float = 0.0) -> None:
        if key in table:
            levers[name] = _scores(*gated_scores(key, gate_name, gate_value), is_lesion)

    lever("flip TTA", (True, *raw_key[1:]))
    for t_ in thresholds:
        lever(f"threshold {t_:g}", (False, t_, "all", 0.0, False))
    lever("largest component", (False, raw_key[1], "largest", 0.0, False))
    lever("drop components < 1%", (False, raw_key[1], "all", 0.01, False))
    lever("fill holes", (False, raw_key[1], "all", 0.0, True))
    for gate_name in ("class", "max_prob", "area"):
        options = [(gn, gv) for gn, gv in gate_options if gn == gate_name]
        scored = [(_objective(*gated_scores(raw_key, gn, gv), is_lesion, max_lesion_empty), gn, gv)
                  for gn, gv in options]
        scored = [s for s in scored if np.isfinite(s[0])]
        if scored:
            _, gn, gv = max(scored, key=lambda s: s[0])
            lever(f"gate {gn} {gv:g} (best alone)", raw_key, gn, gv)
    report["levers"] = levers
    return recipe, report
