"""The inference recipe: what turns a model's probability map into the mask a user gets.

A trained segmenter gives per-pixel lesion probabilities at its training size. Between
those and the final native-resolution mask sit decisions that are tuned on validation
data, never on a test split, and then travel with the checkpoint (``inference.json``), so
that ``evaluate`` and ``predict`` apply them the same way:

1. flip test-time augmentation (average with the mirrored image's prediction);
2. the "no lesion here" gate: an image-level decision that predicts an empty mask when
   the class head's normal probability, the maximum pixel probability, the predicted
   area, or a learned lesion score says so (normal images are 17% of BUSI; a segmenter
   alone marks most of them). The learned gate (:class:`LearnedGate`) is a logistic model
   on statistics of the probability map (maximum, mean of the top 1%, area, mass) and,
   when the model has one, the class head's normal probability, fitted on out-of-fold
   predictions (experiments/oof.py);
3. connected components at the model's resolution (8-connectivity, ``scipy.ndimage``): keep
   the largest, or drop those below a fraction of the image; fill holes;
4. the decision threshold, applied after bilinear resizing to the native size
   (unet_jax.metrics.resize_mask).

:func:`tune_recipe` searches these levers on validation predictions and reports each
lever's effect (the ablation rows); it is :func:`score_recipes` (every image's Dice under
every segmentation setting, computed once) followed by :func:`choose_recipe` (the gate and
setting on any subset of those images: nested cross-validation re-chooses on each subset
without recomputing a mask); the objective is the mean per-image Dice over all
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
from scipy import ndimage

from unet_jax import metrics as M

__all__ = [
    "InferenceRecipe",
    "RAW",
    "LearnedGate",
    "GATE_FEATURES",
    "gate_features",
    "fit_learned_gate",
    "connected_components",
    "fill_holes",
    "select_components",
    "gate_score",
    "gate_decision",
    "recipe_mask",
    "refine_probabilities",
    "LEARNED_GATES",
    "SHAPES",
    "THRESHOLDS",
    "RecipeScores",
    "score_recipes",
    "choose_recipe",
    "recipe_outcome",
    "tune_recipe",
    "NORMAL_CLASS",
]

NORMAL_CLASS = 2  # index of "normal" in (benign, malignant, normal)
GATES = ("none", "class", "max_prob", "area", "learned")
COMPONENTS = ("all", "largest")


# Image-level statistics of a model-resolution probability map (and class head), each on a
# scale where a linear model is sensible (logits of probabilities, logs of fractions).
GATE_FEATURES = ("max_logit", "top1_logit", "log_area", "log_mass", "normal_logit")
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def gate_features(
    probs: np.ndarray, class_probs: np.ndarray | None, names: Sequence[str] = GATE_FEATURES
) -> np.ndarray:
    """Image statistics (N, len(names)) of probability maps ``probs`` (N, h, w) and class
    probabilities (N, K) or None: ``max_logit`` logit of the largest pixel probability;
    ``top1_logit`` logit of the mean of the top 1% of pixels; ``log_area`` log of the
    fraction of pixels above 0.5 (+1e-4); ``log_mass`` log of the mean probability;
    ``normal_logit`` logit of the class head's p(normal)."""
    probs = np.asarray(probs, np.float32).reshape(len(probs), -1)
    k = max(1, int(np.ceil(0.01 * probs.shape[1])))
    columns = {
        "max_logit": lambda: _logit(probs.max(axis=1)),
        "top1_logit": lambda: _logit(np.partition(probs, -k, axis=1)[:, -k:].mean(axis=1)),
        "log_area": lambda: np.log(np.mean(probs > 0.5, axis=1) + 1e-4),
        "log_mass": lambda: np.log(probs.mean(axis=1, dtype=np.float64) + _EPS),
        "normal_logit": lambda: _logit(_need_class(class_probs)[:, NORMAL_CLASS]),
    }
    unknown = [n for n in names if n not in columns]
    if unknown:
        raise ValueError(f"gate features {unknown}: expected some of {list(GATE_FEATURES)}")
    return np.stack([columns[n]() for n in names], axis=1) if names else np.zeros((len(probs), 0))


def _need_class(class_probs: np.ndarray | None) -> np.ndarray:
    if class_probs is None:
        raise ValueError(
            "a gate on the class head's p(normal) needs a model with a class head "
            "(model.class_head=3); expected a gate without 'normal_logit'"
        )
    return np.asarray(class_probs, np.float64).reshape(-1, np.shape(class_probs)[-1])


@dataclasses.dataclass(frozen=True)
class LearnedGate:
    """A logistic model of "this image holds a lesion" on :func:`gate_features`:
    ``p = sigmoid(bias + sum(weights * (features - mean) / scale))``."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def __post_init__(self) -> None:
        for name in ("features", "mean", "scale", "weights"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.features)
        if not n or any(len(getattr(self, f)) != n for f in ("mean", "scale", "weights")):
            raise ValueError(
                f"learned gate: features, mean, scale and weights must have one entry per feature, "
                f"got {[len(getattr(self, f)) for f in ('features', 'mean', 'scale', 'weights')]}"
            )
        if any(f not in GATE_FEATURES for f in self.features):
            raise ValueError(f"learned gate features {list(self.features)}: expected some of {list(GATE_FEATURES)}")
        values = (*self.mean, *self.scale, *self.weights, self.bias)
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for v in values) or min(self.scale) <= 0:
            raise ValueError("learned gate: expected finite numbers and positive scales")

    def lesion_probability(self, probs: np.ndarray, class_probs: np.ndarray | None) -> np.ndarray:
        """p(lesion) (N,) of probability maps (N, h, w) and class probabilities (N, K) or None."""
        z = (gate_features(probs, class_probs, self.features) - np.asarray(self.mean)) / np.asarray(self.scale)
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.weights) + self.bias)))


def fit_learned_gate(
    probs: np.ndarray,
    class_probs: np.ndarray | None,
    has_lesion: np.ndarray,
    features: Sequence[str],
    l2: float = 1.0,
    iterations: int = 50,
) -> LearnedGate:
    """Fit a :class:`LearnedGate` by L2-penalised logistic regression (Newton's method on
    standardised features; the bias is not penalised). ``has_lesion`` (N,) bool."""
    y = np.asarray(has_lesion, np.float64)
    if y.min() == y.max():
        raise ValueError("fit_learned_gate needs images with and without a lesion")
    x = gate_features(probs, class_probs, features)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = np.concatenate([(x - mean) / scale, np.ones((len(x), 1))], axis=1)
    penalty = np.diag([l2] * len(features) + [0.0])
    beta = np.zeros(z.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(z @ beta)))
        gradient = z.T @ (p - y) + penalty @ beta
        hessian = (z * (p * (1 - p))[:, None]).T @ z + penalty + 1e-9 * np.eye(len(beta))
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return LearnedGate(
        tuple(features),
        tuple(map(float, mean)),
        tuple(map(float, scale)),
        tuple(map(float, beta[:-1])),
        float(beta[-1]),
    )


@dataclasses.dataclass(frozen=True)
class InferenceRecipe:
    """How probabilities become a mask (see the module docstring).

    threshold: probability above which a pixel is lesion, in (0, 1).
    flip_tta: average with the horizontally mirrored image's prediction.
    gate: "none"; "class" (empty when the class head's p(normal) >= gate_threshold);
      "max_prob" (empty when no pixel reaches gate_threshold); "area" (empty when the
      predicted area is below gate_threshold, a fraction of the image); "learned" (empty
      when ``gate_model``'s lesion probability is below gate_threshold).
    gate_model: the :class:`LearnedGate` of gate "learned" (None otherwise).
    components: "all", or "largest" (keep the largest 8-connected component).
    min_component_fraction: drop components smaller than this fraction of the image.
    fill_holes: fill background regions enclosed by the lesion.
    tuned_on: where the recipe was chosen (provenance only).
    """

    threshold: float = 0.5
    flip_tta: bool = False
    gate: Literal["none", "class", "max_prob", "area"] = "none"
    gate_threshold: float = 0.0
    gate_model: LearnedGate | None = None
    components: Literal["all", "largest"] = "all"
    min_component_fraction: float = 0.0
    fill_holes: bool = False
    tuned_on: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.gate_model, dict):  # read back from JSON
            object.__setattr__(self, "gate_model", LearnedGate(**self.gate_model))
        checks = [
            ("threshold", isinstance(self.threshold, (int, float)) and 0 < self.threshold < 1, "in (0, 1)"),
            ("flip_tta", isinstance(self.flip_tta, bool), "true or false"),
            ("gate", self.gate in GATES, f"one of {list(GATES)}"),
            (
                "gate_threshold",
                isinstance(self.gate_threshold, (int, float)) and 0 <= self.gate_threshold <= 1,
                "a number in [0, 1]",
            ),
            ("components", self.components in COMPONENTS, f"one of {list(COMPONENTS)}"),
            (
                "min_component_fraction",
                isinstance(self.min_component_fraction, (int, float)) and 0 <= self.min_component_fraction < 1,
                "a fraction in [0, 1)",
            ),
            ("fill_holes", isinstance(self.fill_holes, bool), "true or false"),
            (
                "gate_model",
                (self.gate_model is not None) == (self.gate == "learned"),
                "a learned gate exactly when gate = 'learned'",
            ),
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
        try:
            return cls(**values)
        except TypeError as err:  # a gate_model with missing or unknown keys
            raise ValueError(f"{source}: gate_model {err}; expected the keys of a LearnedGate") from err

    def describe(self) -> str:
        parts = [f"threshold {self.threshold:g}"]
        if self.flip_tta:
            parts.append("flip TTA")
        if self.gate == "learned":
            parts.append(f"learned gate p(lesion) < {self.gate_threshold:g} on {'+'.join(self.gate_model.features)}")
        elif self.gate != "none":
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
# Binary morphology (scipy.ndimage: one sweep, linear in the pixels, at any image size)
# --------------------------------------------------------------------------------------
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D boolean mask: ``(labels (H, W) int32, count)``,
    labels 1..count by first pixel in raster order, 0 for background
    (``scipy.ndimage.label`` with an all-ones 3x3 structure: linear time, so predict can
    call it on a native-size mask)."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"connected_components expects a 2-D mask, got shape {mask.shape}")
    labels, count = ndimage.label(mask, structure=_EIGHT)
    return labels.astype(np.int32, copy=False), int(count)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the border filled
    (4-connected background, the complement of 8-connected foreground:
    ``scipy.ndimage.binary_fill_holes`` with its default cross structure)."""
    return ndimage.binary_fill_holes(np.asarray(mask, bool))


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
def gate_score(
    gate: str, prob: np.ndarray, class_prob: np.ndarray | None, threshold: float, model: LearnedGate | None = None
) -> float:
    """The image-level score a gate compares with its threshold (higher = more lesion-like
    for max_prob, area and learned; for "class" the normal probability, higher = more
    normal). Gate "learned" needs its ``model``."""
    if gate == "learned":
        if model is None:
            raise ValueError("inference recipe gate = 'learned' needs its gate_model")
        class_row = None if class_prob is None else np.asarray(class_prob)[None]
        return float(model.lesion_probability(np.asarray(prob)[None], class_row)[0])
    if gate == "class":
        if class_prob is None:
            raise ValueError(
                "inference recipe gate = 'class' needs a model with a class head "
                "(model.class_head=3); expected gate 'none', 'max_prob' or 'area'"
            )
        return float(class_prob[NORMAL_CLASS])
    if gate == "max_prob":
        return float(np.max(prob))
    if gate == "area":
        return float(np.mean(prob > threshold))
    return 0.0


def gate_decision(
    recipe: InferenceRecipe, prob: np.ndarray, class_prob: np.ndarray | None
) -> tuple[bool, float | None]:
    """``(emptied, score)``: whether the recipe's gate empties this image's mask, and the
    score it compared (None without a gate)."""
    if recipe.gate == "none":
        return False, None
    score = gate_score(recipe.gate, prob, class_prob, recipe.threshold, recipe.gate_model)
    return (score >= recipe.gate_threshold if recipe.gate == "class" else score < recipe.gate_threshold), score


def _gated(recipe: InferenceRecipe, prob: np.ndarray, class_prob: np.ndarray | None) -> bool:
    return gate_decision(recipe, prob, class_prob)[0]


def refine_probabilities(prob: np.ndarray, recipe: InferenceRecipe) -> np.ndarray:
    """Component selection and hole filling on the model-resolution probabilities.

    Dropped components are zeroed beyond a one-pixel ring (kept so that bilinear resizing
    still sees the sub-threshold values at the kept lesion's edge); holes are set to 1.
    """
    binary = prob > recipe.threshold
    kept = select_components(binary, recipe)
    out = prob
    if kept is not binary:
        ring = ndimage.binary_dilation(kept, structure=_EIGHT)  # the kept pixels and their 8 neighbours
        out = np.where(ring, prob, 0.0).astype(np.float32)
    if recipe.fill_holes:
        filled = fill_holes(kept)
        out = np.where(filled & ~kept, 1.0, out).astype(np.float32)
    return out


def recipe_mask(
    prob: np.ndarray, class_prob: np.ndarray | None, recipe: InferenceRecipe, size: tuple[int, int]
) -> np.ndarray:
    """The final boolean mask (size = (height, width)) of one image's model-resolution
    probabilities ``prob`` (H, W) (flip-averaged already when the recipe says so) and
    class probabilities (K,) or None."""
    if _gated(recipe, prob, class_prob):
        return np.zeros(tuple(size), bool)
    return M.resize_mask(refine_probabilities(np.asarray(prob, np.float32), recipe), size, t=recipe.threshold)


# --------------------------------------------------------------------------------------
# Tuning on validation (or pooled out-of-fold) predictions
# --------------------------------------------------------------------------------------
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
# (components, area floor, fill holes) settings searched.
SHAPES = (
    ("all", 0.0, False),
    ("largest", 0.0, False),
    ("all", 0.01, False),
    ("all", 0.0, True),
    ("largest", 0.0, True),
)
# The learned gates' designs: statistics of the map alone, or with the class head.
LEARNED_GATES = {"map": GATE_FEATURES[:4], "map+head": GATE_FEATURES}
_LEARNED_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclasses.dataclass(frozen=True)
class RecipeScores:
    """Every image's outcome under every ungated segmentation setting, computed once.

    variants: flip TTA (False/True) -> model-resolution probabilities (N, h, w);
    table: (flip, threshold, components, floor, fill) -> (Dice, IoU, predicted empty) (N,)
    each, at the ground truth's resolution; is_lesion (N,) bool.
    """

    variants: dict[bool, np.ndarray]
    table: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]]
    is_lesion: np.ndarray
    thresholds: tuple[float, ...]

    @property
    def raw_key(self) -> tuple:
        return (False, 0.5 if 0.5 in self.thresholds else self.thresholds[0], "all", 0.0, False)


def score_recipes(
    probs: np.ndarray,
    probs_flip: np.ndarray | None,
    gts: Sequence[np.ndarray],
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    progress: Callable[[int, int], None] | None = None,
) -> RecipeScores:
    """Score every ungated setting (flip x threshold x :data:`SHAPES`) on every image.

    probs, probs_flip: (N, h, w) model-resolution probabilities of the images and of their
    mirrored copies mirrored back (None: TTA not considered); gts: N boolean masks (an
    all-zero mask is a normal image), compared at their own resolution.
    """
    n = len(gts)
    if n == 0 or probs.shape[0] != n or (probs_flip is not None and probs_flip.shape != probs.shape):
        raise ValueError(f"score_recipes: {probs.shape[0]} probability maps for {n} masks; expected as many, >= 1")
    variants = {False: probs} if probs_flip is None else {False: probs, True: 0.5 * (probs + probs_flip)}
    combos = list(itertools.product(variants, thresholds, SHAPES))
    gts = [np.asarray(g, bool) for g in gts]
    table = {}
    for k, (flip, t, (comp, floor, fill)) in enumerate(combos):
        recipe = InferenceRecipe(
            threshold=t, flip_tta=flip, components=comp, min_component_fraction=floor, fill_holes=fill
        )
        dice, iou, empty = np.zeros(n), np.zeros(n), np.zeros(n, bool)
        for i in range(n):
            mask = recipe_mask(variants[flip][i], None, recipe, gts[i].shape)
            dice[i], iou[i], empty[i] = M.dice(mask, gts[i]), M.iou(mask, gts[i]), not mask.any()
        table[(flip, t, comp, floor, fill)] = (dice, iou, empty)
        if progress is not None:
            progress(k + 1, len(combos))
    return RecipeScores(variants, table, np.array([g.any() for g in gts]), tuple(thresholds))


def _objective(dice: np.ndarray, empty: np.ndarray, is_lesion: np.ndarray, max_lesion_empty: float) -> float:
    lesion_empty = float(np.mean(empty[is_lesion])) if is_lesion.any() else 0.0
    if lesion_empty > max_lesion_empty + 1e-9:
        return -np.inf
    return float(np.mean(dice))


def _scores(dice: np.ndarray, empty: np.ndarray, is_lesion: np.ndarray) -> dict[str, Any]:
    """One setting's row: Dice over all and lesion images, the two rates (and, beside them,
    their counts with Wilson intervals: :func:`unet_jax.metrics.rate_summary`)."""
    normal = ~is_lesion
    return {
        "dice_all": float(np.mean(dice)),
        "lesion_dice": float(np.mean(dice[is_lesion])) if is_lesion.any() else float("nan"),
        "normal_false_positive_rate": float(np.mean(~empty[normal])) if normal.any() else float("nan"),
        "lesion_empty_rate": float(np.mean(empty[is_lesion])) if is_lesion.any() else float("nan"),
        "normal_false_positive": M.rate_summary(~empty[normal]),
        "lesion_empty": M.rate_summary(empty[is_lesion]),
    }


def _gate_off(
    scores: RecipeScores, recipe: InferenceRecipe, class_probs: np.ndarray | None, idx: np.ndarray
) -> np.ndarray:
    """Which of the images ``idx`` the recipe's gate empties (exactly as recipe_mask does)."""
    prob = scores.variants[recipe.flip_tta][idx]
    g = recipe.gate_threshold
    if recipe.gate == "none":
        return np.zeros(len(idx), bool)
    if recipe.gate == "class":
        return _need_class(class_probs)[idx, NORMAL_CLASS] >= g
    if recipe.gate == "max_prob":
        return prob.reshape(len(idx), -1).max(axis=1) < g
    if recipe.gate == "area":
        return np.mean(prob.reshape(len(idx), -1) > recipe.threshold, axis=1) < g
    cls = None if class_probs is None else np.asarray(class_probs)[idx]
    return recipe.gate_model.lesion_probability(prob, cls) < g


def recipe_outcome(
    scores: RecipeScores, recipe: InferenceRecipe, class_probs: np.ndarray | None, idx: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Dice, IoU, predicted empty) of the images ``idx`` (default: all) under ``recipe``,
    whose segmentation setting must be one of the scored ones; an emptied normal image
    scores 1, an emptied lesion image 0."""
    idx = np.arange(len(scores.is_lesion)) if idx is None else np.asarray(idx)
    key = (recipe.flip_tta, recipe.threshold, recipe.components, recipe.min_component_fraction, recipe.fill_holes)
    if key not in scores.table:
        raise ValueError(f"recipe {recipe.describe()!r} was not scored; expected one of the searched settings")
    dice, iou, empty = (a[idx] for a in scores.table[key])
    off = _gate_off(scores, recipe, class_probs, idx)
    normal = (~scores.is_lesion[idx]).astype(np.float64)
    return np.where(off, normal, dice), np.where(off, normal, iou), empty | off


def _gate_options(
    scores: RecipeScores, class_probs: np.ndarray | None, idx: np.ndarray, learned: Sequence[str]
) -> list[tuple[str, float, dict[bool, LearnedGate | None]]]:
    # Order matters on ties (the earlier option is kept). A class head was trained to tell
    # normal images from lesion images, so its gate comes first: it stays on unless the
    # tuning images say it costs Dice. Then no gate, then the hand-made rules, then the
    # learned gates (fitted here, on the tuning images only, once per flip setting).
    options: list[tuple[str, float, dict]] = []
    if class_probs is not None:
        options += [("class", g, {}) for g in (0.5, 0.4, 0.6, 0.3, 0.7, 0.8, 0.9)]
    options += [("none", 0.0, {})]
    options += [("max_prob", g, {}) for g in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)]
    options += [("area", g, {}) for g in (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03)]
    lesion = scores.is_lesion[idx]
    for design in learned:
        if lesion.all() or not lesion.any():
            break
        cls = None if class_probs is None else np.asarray(class_probs)[idx]
        models = {
            flip: fit_learned_gate(v[idx], cls, lesion, LEARNED_GATES[design]) for flip, v in scores.variants.items()
        }
        options += [(f"learned {design}", g, models) for g in _LEARNED_THRESHOLDS]
    return options


def _with_gate(base: InferenceRecipe, gate: str, g: float, models: dict) -> InferenceRecipe:
    if gate.startswith("learned"):
        return dataclasses.replace(base, gate="learned", gate_threshold=g, gate_model=models[base.flip_tta])
    return dataclasses.replace(base, gate=gate, gate_threshold=g)


def _lever_rows(
    scores: RecipeScores,
    bases: dict[tuple, InferenceRecipe],
    options: list,
    outcome: Callable[[InferenceRecipe], tuple[np.ndarray, np.ndarray]],
    is_lesion: np.ndarray,
    max_lesion_empty: float,
) -> dict[str, dict[str, float]]:
    """The ablation rows of :func:`choose_recipe`: each lever added alone to the raw model
    (a gate at its best threshold alone)."""
    raw = bases[scores.raw_key]
    levers: dict[str, dict[str, float]] = {}
    if (True, *scores.raw_key[1:]) in bases:
        levers["flip TTA"] = _scores(*outcome(bases[(True, *scores.raw_key[1:])]), is_lesion)
    for t in scores.thresholds:
        levers[f"threshold {t:g}"] = _scores(*outcome(bases[(False, t, "all", 0.0, False)]), is_lesion)
    t = scores.raw_key[1]
    levers["largest component"] = _scores(*outcome(bases[(False, t, "largest", 0.0, False)]), is_lesion)
    levers["drop components < 1%"] = _scores(*outcome(bases[(False, t, "all", 0.01, False)]), is_lesion)
    levers["fill holes"] = _scores(*outcome(bases[(False, t, "all", 0.0, True)]), is_lesion)
    for name in dict.fromkeys(gate for gate, _, _ in options if gate != "none"):
        scored = [
            (_objective(*outcome(r), is_lesion, max_lesion_empty), r)
            for r in (_with_gate(raw, gate, g, m) for gate, g, m in options if gate == name)
        ]
        scored = [s for s in scored if np.isfinite(s[0])]
        if scored:
            r = max(scored, key=lambda s: s[0])[1]
            levers[f"gate {name} {r.gate_threshold:g} (best alone)"] = _scores(*outcome(r), is_lesion)
    return levers


def choose_recipe(
    scores: RecipeScores,
    class_probs: np.ndarray | None,
    *,
    idx: np.ndarray | None = None,
    max_lesion_empty: float = 0.05,
    tuned_on: str = "validation split",
    learned_gates: Sequence[str] = (),
) -> tuple[InferenceRecipe, dict[str, Any]]:
    """Choose the recipe on the images ``idx`` (default: all) of ``scores``; returns
    ``(recipe, report)``. The objective is the mean Dice over those images (an emptied
    normal image scores 1) with at most ``max_lesion_empty`` of the lesion images emptied.
    ``learned_gates``: designs of :data:`LEARNED_GATES` to fit on these images and try.
    The report holds the chosen recipe's scores, the raw model's, and one row per lever
    added alone to the raw model (the ablation rows)."""
    idx = np.arange(len(scores.is_lesion)) if idx is None else np.asarray(idx)
    is_lesion = scores.is_lesion[idx]
    unknown = [d for d in learned_gates if d not in LEARNED_GATES]
    if unknown:
        raise ValueError(f"learned gate designs {unknown}: expected some of {list(LEARNED_GATES)}")
    options = _gate_options(scores, class_probs, idx, learned_gates)
    bases = {
        key: InferenceRecipe(
            threshold=key[1], flip_tta=key[0], components=key[2], min_component_fraction=key[3], fill_holes=key[4]
        )
        for key in scores.table
    }

    def outcome(recipe: InferenceRecipe) -> tuple[np.ndarray, np.ndarray]:
        dice, _, empty = recipe_outcome(scores, recipe, class_probs, idx)
        return dice, empty

    best, best_value = None, -np.inf
    for key, base in bases.items():
        for gate, g, models in options:
            recipe = _with_gate(base, gate, g, models)
            value = _objective(*outcome(recipe), is_lesion, max_lesion_empty)
            if value > best_value + 1e-12:  # ties keep the earlier (simpler) option
                best, best_value = recipe, value
    raw = bases[scores.raw_key]
    recipe = dataclasses.replace(best if best is not None else raw, tuned_on=tuned_on)  # None: even raw is over budget
    report: dict[str, Any] = {
        "images": int(len(idx)),
        "lesion_images": int(is_lesion.sum()),
        "max_lesion_empty": max_lesion_empty,
        "recipe": recipe.to_dict(),
        "chosen": _scores(*outcome(recipe), is_lesion),
        "raw": _scores(*outcome(raw), is_lesion),
    }
    levers = _lever_rows(scores, bases, options, outcome, is_lesion, max_lesion_empty)
    report["levers"] = levers
    return recipe, report


def tune_recipe(
    probs: np.ndarray,
    probs_flip: np.ndarray | None,
    class_probs: np.ndarray | None,
    gts: Sequence[np.ndarray],
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    max_lesion_empty: float = 0.05,
    tuned_on: str = "validation split",
    learned_gates: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
) -> tuple[InferenceRecipe, dict[str, Any]]:
    """Choose the recipe on validation predictions: :func:`score_recipes` then
    :func:`choose_recipe` on all of them; returns ``(recipe, report)``.

    probs, probs_flip: (N, h, w) model-resolution probabilities without / with flip TTA
    (None: TTA not considered); class_probs (N, K) or None; gts: N native boolean masks
    (an all-zero mask is a normal image).
    """
    if probs.shape[0] != len(gts) or not len(gts):
        raise ValueError(f"tune_recipe: {probs.shape[0]} probability maps for {len(gts)} masks; expected as many, >= 1")
    scores = score_recipes(probs, probs_flip, gts, thresholds=thresholds, progress=progress)
    return choose_recipe(
        scores, class_probs, max_lesion_empty=max_lesion_empty, tuned_on=tuned_on, learned_gates=learned_gates
    )
