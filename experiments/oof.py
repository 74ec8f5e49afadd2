"""The inference recipe chosen on pooled out-of-fold predictions (issue 19).

experiments/cv.py trains one model per fold and stores, for every image, the prediction
of the one fold model that never trained on it (``fold_i/predictions/oof.npz``). This
script, on those 624 out-of-fold predictions and the native-resolution ground truth:

1. scores every segmentation setting once (flip TTA x threshold x components / holes);
2. chooses the recipe on all 624 (the bundled ensemble's recipe) and reports each lever
   alone (the ablation rows);
3. nests the choice: for each fold, the recipe is chosen on the other folds' images and
   applied to the held-out fold, so the pooled figures are not inflated by the choice;
4. measures the lesion-vs-normal decision: the class head's p(normal), the maximum pixel
   probability, and two learned gates (map statistics; map statistics + class head), each
   fitted on the other folds (nested), as ROC curves and AUCs;
5. checks that the recipe transfers to an average of models: images in a fold's
   validation part were seen by neither that fold's model nor their own test fold's
   model, so they have a two-member out-of-fold average to compare with one member.

    python3 experiments/oof.py --cv runs/ensemble --data ../shared/data \\
        --out experiments/results/ensemble_cpu

Writes ``oof_results.json``, ``inference.json`` (the pooled recipe, for
``unet-jax export --recipe``) and ``lesion_vs_normal_roc.png`` into ``--out``, and prints
the tables of experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cv import pooled  # noqa: E402  (experiments/ is the script's folder, first on sys.path)

from unet_jax import metrics as M  # noqa: E402
from unet_jax._io import atomic_write  # noqa: E402
from unet_jax.data import ReadOptions, load_busi  # noqa: E402
from unet_jax.inference import (  # noqa: E402
    LEARNED_GATES,
    NORMAL_CLASS,
    RAW,
    choose_recipe,
    fit_learned_gate,
    recipe_mask,
    score_recipes,
)

DESIGNS = tuple(LEARNED_GATES)  # the learned gates tried: "map", "map+head"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_folds(cv: Path) -> list[dict[str, np.ndarray]]:
    """Every fold's oof.npz, in fold order; an error names a missing one."""
    folds = []
    for run in sorted(cv.glob("fold_*/"), key=lambda p: int(p.name.split("_")[1])):
        path = run / "predictions" / "oof.npz"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run experiments/cv.py with the same arguments first")
        with np.load(path) as z:
            folds.append({k: z[k] for k in z.files})
    if not folds:
        raise SystemExit(f"no fold_*/predictions/oof.npz under {cv}")
    return folds


def pool_test_parts(folds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The held-out (test) predictions of all folds, one per image, with its fold number."""
    keys = ("probs", "probs_flip", "class_probs")
    parts: dict[str, list] = {k: [] for k in (*keys, "ids", "fold")}
    for f, z in enumerate(folds):
        test = z["parts"] == "test"
        for k in keys:
            parts[k].append(np.asarray(z[k][test], np.float32))
        parts["ids"] += list(z["ids"][test])
        parts["fold"] += [f] * int(test.sum())
    out = {k: np.concatenate(parts[k]) for k in keys}
    out["ids"], out["fold"] = np.asarray(parts["ids"]), np.asarray(parts["fold"])
    if len(set(out["ids"])) != len(out["ids"]):
        raise SystemExit("an image is in two test folds: the fold manifests are not a partition")
    return out


def image_rows(
    oof: dict[str, np.ndarray], idx: np.ndarray, recipe: Any, gts: list[np.ndarray], classes: list[str]
) -> list[dict[str, Any]]:
    """Per-image metrics (unet_jax.metrics.image_metrics) of images ``idx`` under ``recipe``."""
    maps = 0.5 * (oof["probs"] + oof["probs_flip"]) if recipe.flip_tta else oof["probs"]
    rows = []
    for i in idx:
        pred = recipe_mask(maps[i], oof["class_probs"][i], recipe, gts[i].shape)
        rows.append(
            {
                "id": str(oof["ids"][i]),
                "class": classes[i],
                "fold": int(oof["fold"][i]),
                **M.image_metrics(pred, gts[i]),
            }
        )
    return rows


def nested(
    scores: Any, oof: dict[str, np.ndarray], gts: list[np.ndarray], classes: list[str], max_lesion_empty: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """For each fold: the recipe chosen on the other folds, applied to this one. Returns
    (per-fold rows, recipe rows, raw rows)."""
    per_fold, rows, raw_rows = [], [], []
    for f in np.unique(oof["fold"]):
        held, others = np.flatnonzero(oof["fold"] == f), np.flatnonzero(oof["fold"] != f)
        recipe, _ = choose_recipe(
            scores,
            oof["class_probs"],
            idx=others,
            max_lesion_empty=max_lesion_empty,
            tuned_on=f"out-of-fold predictions of the folds other than {f}",
            learned_gates=DESIGNS,
        )
        fold_rows = image_rows(oof, held, recipe, gts, classes)
        fold_raw = image_rows(oof, held, RAW, gts, classes)
        agg = M.aggregate(fold_rows, n_boot=0)
        per_fold.append(
            {
                "fold": int(f),
                "images": int(len(held)),
                "recipe": recipe.describe(),
                "lesion_dice": agg["dice"]["lesion"]["mean"],
                "lesion_iou": agg["iou"]["lesion"]["mean"],
                "normal_false_positive_rate": agg["normal_false_positive_rate"]["rate"],
                "lesion_empty_prediction_rate": agg["lesion_empty_prediction_rate"]["rate"],
                "normal_false_positive": agg["normal_false_positive_rate"],  # counts, Wilson interval
                "lesion_empty_prediction": agg["lesion_empty_prediction_rate"],
                "raw_lesion_dice": M.aggregate(fold_raw, n_boot=0)["dice"]["lesion"]["mean"],
            }
        )
        rows += fold_rows
        raw_rows += fold_raw
        log(f"nested fold {f}: {recipe.describe()}")
    return per_fold, rows, raw_rows


def roc_points(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold, highest score
    first: tied scores are one point (a diagonal step), so the plotted area is the AUC."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    order = np.argsort(-scores, kind="mergesort")
    pos = positive[order]
    last = np.flatnonzero(np.diff(scores[order]) != 0).tolist() + [len(scores) - 1]  # each threshold's last
    tpr = np.concatenate([[0.0], np.cumsum(pos)[last] / max(pos.sum(), 1)])
    fpr = np.concatenate([[0.0], np.cumsum(~pos)[last] / max((~pos).sum(), 1)])
    return fpr, tpr


def lesion_scores(oof: dict[str, np.ndarray], is_lesion: np.ndarray, flip: bool) -> dict[str, np.ndarray]:
    """Out-of-fold lesion-vs-normal scores of each design (learned gates fitted on the
    other folds and scored on the held-out one)."""
    maps = 0.5 * (oof["probs"] + oof["probs_flip"]) if flip else oof["probs"]
    out = {
        "class head: 1 - p(normal)": 1.0 - oof["class_probs"][:, NORMAL_CLASS],
        "max pixel probability": maps.reshape(len(maps), -1).max(axis=1),
    }
    for design in DESIGNS:
        score = np.zeros(len(maps))
        for f in np.unique(oof["fold"]):
            held, others = oof["fold"] == f, oof["fold"] != f
            gate = fit_learned_gate(maps[others], oof["class_probs"][others], is_lesion[others], LEARNED_GATES[design])
            score[held] = gate.lesion_probability(maps[held], oof["class_probs"][held])
        out[f"learned gate ({design})"] = score
    return out


def plot_roc(curves: dict[str, np.ndarray], is_lesion: np.ndarray, operating: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=120)
    for name, score in curves.items():
        fpr, tpr = roc_points(score, is_lesion)
        ax.plot(fpr, tpr, label=f"{name} (AUC {M.roc_auc(score, is_lesion):.3f})")
    # Axes as a user reads them: normal images marked (x) against lesion images kept (y).
    ax.plot(
        operating["normal_marked_rate"],
        operating["lesion_kept_rate"],
        "k*",
        markersize=12,
        label=f"chosen gate ({operating['normal_marked_rate']:.2f}, {operating['lesion_kept_rate']:.2f})",
    )
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
    ax.set_xlabel("normal images marked as lesion (false-positive rate)")
    ax.set_ylabel("lesion images marked as lesion (true-positive rate)")
    ax.set_title(
        f"Lesion vs normal, out of fold ({int(is_lesion.sum())} lesion, {int((~is_lesion).sum())} normal)", fontsize=9
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def transfer_check(
    folds: list[dict[str, np.ndarray]], oof: dict[str, np.ndarray], recipe: Any, gts_by_id: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The recipe on one member against a two-member average, on the same images: those of
    a fold's validation part (out of that fold's model and of their own test fold's model)."""
    position = {str(i): k for k, i in enumerate(oof["ids"])}
    single, pair, ids = [], [], []
    for z in folds:
        for k in np.flatnonzero(z["parts"] == "val"):
            image = str(z["ids"][k])
            if image not in position:  # only when some folds are missing
                continue
            j = position[image]
            p1 = (oof["probs"][j], oof["probs_flip"][j], oof["class_probs"][j])
            p2 = (
                np.asarray(z["probs"][k], np.float32),
                np.asarray(z["probs_flip"][k], np.float32),
                z["class_probs"][k],
            )
            single.append(p1)
            pair.append(tuple(0.5 * (a + b) for a, b in zip(p1, p2)))
            ids.append(image)
    out: dict[str, Any] = {"images": len(ids)}
    for name, preds in (("one member", single), ("two-member average", pair)):
        rows = []
        for image, (prob, flipped, cls) in zip(ids, preds):
            maps = 0.5 * (prob + flipped) if recipe.flip_tta else prob
            gt = gts_by_id[image]
            rows.append(
                {
                    "class": "normal" if not gt.any() else "lesion",
                    **M.image_metrics(recipe_mask(maps, cls, recipe, gt.shape), gt),
                }
            )
        agg = M.aggregate(rows, classes=("lesion", "normal"), lesion_classes=("lesion",), n_boot=0)
        maps = np.stack([0.5 * (p + f) if recipe.flip_tta else p for p, f, _ in preds])
        cls = np.stack([c for _, _, c in preds])
        has_lesion = np.array([r["class"] == "lesion" for r in rows])
        maxima = maps.reshape(len(maps), -1).max(axis=1)
        out[name] = {
            "lesion_dice": agg["dice"]["lesion"]["mean"],
            "normal_false_positive_rate": agg["normal_false_positive_rate"]["rate"],
            "lesion_empty_prediction_rate": agg["lesion_empty_prediction_rate"]["rate"],
            "normal_false_positive": agg["normal_false_positive_rate"],  # counts, Wilson interval
            "lesion_empty_prediction": agg["lesion_empty_prediction_rate"],
            "normal_images": agg["counts"]["normal"],
            "lesion_images": agg["counts"]["lesion"],
            "median_max_probability": float(np.median(maxima)),
            "auc_max_probability": M.roc_auc(maxima, has_lesion),
            "auc_class_head": M.roc_auc(1.0 - cls[:, NORMAL_CLASS], has_lesion),
        }
        if recipe.gate == "learned":
            out[name]["auc_learned_gate"] = M.roc_auc(recipe.gate_model.lesion_probability(maps, cls), has_lesion)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cv", required=True, help="the --out folder of experiments/cv.py")
    parser.add_argument("--data", required=True, help="the BUSI folder the folds were made from (native masks)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-lesion-empty", type=float, default=0.05)
    args = parser.parse_args(argv)
    started = time.time()
    cv, out = Path(args.cv), Path(args.out)
    folds = read_folds(cv)
    oof = pool_test_parts(folds)
    size = oof["probs"].shape[1:]
    log(f"{len(oof['ids'])} out-of-fold predictions from {len(folds)} folds; reading native masks")
    data = load_busi(args.data, ReadOptions(size=size, channels=1, keep_original=True))
    where = {i: k for k, i in enumerate(data.ids)}
    missing = [i for i in oof["ids"] if i not in where]
    if missing:
        raise SystemExit(f"{len(missing)} predicted images are not in {args.data} (e.g. {missing[0]!r})")
    gts = [np.asarray(data.original_masks[where[i]], bool) for i in oof["ids"]]
    classes = [data.class_names[where[i]] for i in oof["ids"]]
    is_lesion = np.array([g.any() for g in gts])

    log("scoring every segmentation setting on every image")
    scores = score_recipes(
        oof["probs"], oof["probs_flip"], gts, progress=lambda d, n: log(f"  setting {d}/{n}") if d % 10 == 0 else None
    )
    recipe, report = choose_recipe(
        scores,
        oof["class_probs"],
        max_lesion_empty=args.max_lesion_empty,
        tuned_on=f"pooled out-of-fold predictions of {len(folds)} fold models ({len(gts)} images)",
        learned_gates=DESIGNS,
    )
    log(f"pooled recipe: {recipe.describe()}")
    per_fold, rows, raw_rows = nested(scores, oof, gts, classes, args.max_lesion_empty)
    curves = lesion_scores(oof, is_lesion, recipe.flip_tta)
    off = np.array([not r["pred_area"] for r in rows])
    lesion_rows = np.array([r["class"] != "normal" for r in rows])
    operating = {
        "normal_marked_rate": float(np.mean(~off[~lesion_rows])),
        "lesion_kept_rate": float(np.mean(~off[lesion_rows])),
        "note": "nested: each fold's recipe (gate included) chosen on the other folds",
    }
    results = {
        "cv": str(cv),
        "images": len(gts),
        "lesion_images": int(is_lesion.sum()),
        "normal_images": int((~is_lesion).sum()),
        "recipe": recipe.to_dict(),
        "recipe_description": recipe.describe(),
        "pooled_choice": report,
        "nested_folds": per_fold,
        "nested": pooled(rows, seed=0),
        "nested_raw": pooled(raw_rows, seed=0),
        "lesion_vs_normal_auc": {k: M.roc_auc(v, is_lesion) for k, v in curves.items()},
        "operating_point": operating,
        "transfer": transfer_check(folds, oof, recipe, dict(zip(map(str, oof["ids"]), gts))),
        "per_image": rows,
        "wall_time_s": time.time() - started,
    }
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(M.to_jsonable(results), indent=1) + "\n"
    atomic_write(out / "oof_results.json", lambda tmp: Path(tmp).write_text(text))
    recipe_text = json.dumps(M.to_jsonable({"recipe": recipe.to_dict(), "validation": report}), indent=2) + "\n"
    atomic_write(out / "inference.json", lambda tmp: Path(tmp).write_text(recipe_text))
    plot_roc(curves, is_lesion, operating, out / "lesion_vs_normal_roc.png")
    print(format_tables(results))
    return 0


def _ci(s: dict[str, Any]) -> str:
    return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def _rate(s: dict[str, Any]) -> str:
    """``count/n (rate) [Wilson 95% interval]``."""
    lo, hi = M.wilson_ci(s["count"], s["n"])
    return f"{s['count']}/{s['n']} ({s['rate']:.1%}) [{lo:.3f}, {hi:.3f}]"


def format_tables(r: dict[str, Any]) -> str:
    lines = [
        "| fold | recipe chosen on the other folds | lesion Dice | lesion IoU | normals marked | "
        "lesion images empty | raw lesion Dice |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in r["nested_folds"]:
        lines.append(
            f"| {f['fold']} | {f['recipe']} | {f['lesion_dice']:.3f} | {f['lesion_iou']:.3f} | "
            f"{M.rate_cell(f.get('normal_false_positive'), f['normal_false_positive_rate'])} | "
            f"{M.rate_cell(f.get('lesion_empty_prediction'), f['lesion_empty_prediction_rate'])} | "
            f"{f['raw_lesion_dice']:.3f} |"
        )
    lines += [
        "",
        "| pooled, nested | lesion Dice | lesion IoU | HD95 (px) | normals predicted empty | lesion images empty |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("nested", "nested_raw"):
        s = r[name]
        nfp = s["normal_false_positive_rate"]
        empty_normals = {"count": nfp["n"] - nfp["count"], "n": nfp["n"], "rate": 1 - nfp["rate"]}
        lines.append(
            f"| {name} | {_ci(s['dice']['lesion'])} | {_ci(s['iou']['lesion'])} | "
            f"{s['hd95']['lesion']['mean']:.1f} | {_rate(empty_normals)} | "
            f"{_rate(s['lesion_empty_prediction_rate'])} |"
        )
    lines += [
        "",
        f"Pooled recipe: {r['recipe_description']}",
        "",
        "| lever alone (pooled out-of-fold, not nested) | lesion Dice | normal FP rate | lesion empty rate | "
        "Dice, all images |",
        "|---|---|---|---|---|",
    ]
    choice = r["pooled_choice"]
    rows = [("raw model output", choice["raw"]), *choice["levers"].items(), ("chosen recipe", choice["chosen"])]
    for name, s in rows:
        lines.append(
            f"| {name} | {s['lesion_dice']:.3f} | "
            f"{M.rate_cell(s.get('normal_false_positive'), s['normal_false_positive_rate'])} | "
            f"{M.rate_cell(s.get('lesion_empty'), s['lesion_empty_rate'])} | {s['dice_all']:.3f} |"
        )
    lines += ["", "| lesion-vs-normal score (out of fold) | AUC |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in r["lesion_vs_normal_auc"].items()]
    t = r["transfer"]
    lines += [
        "",
        f"Transfer to an average ({t['images']} validation-part images):",
        "",
        "| predictions | lesion Dice | normal FP rate | lesion empty rate | median max probability | "
        "AUC max prob | AUC class head | AUC learned gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("one member", "two-member average"):
        s = t[name]
        lines.append(
            f"| {name} | {s['lesion_dice']:.3f} | "
            f"{M.rate_cell(s.get('normal_false_positive'), s['normal_false_positive_rate'])} | "
            f"{M.rate_cell(s.get('lesion_empty_prediction'), s['lesion_empty_prediction_rate'])} | "
            f"{s['median_max_probability']:.3f} | "
            f"{s['auc_max_probability']:.3f} | {s['auc_class_head']:.3f} | "
            f"{s.get('auc_learned_gate', float('nan')):.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
