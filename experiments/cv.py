"""k-fold cross-validation of a whole training recipe (issue 10), so that one lucky split
is not the claim.

Every image of the data is tested exactly once: fold i tests on the i-th duplicate-aware,
class-stratified fold and trains on the others, less a validation part that early-stops
the run and chooses its inference recipe (unet_jax.data.cross_validation_splits). The
per-image test rows of all folds are pooled; means come with percentile-bootstrap 95%
intervals over images (unet_jax.metrics.aggregate), beside each fold's own means.

    python3 experiments/cv.py --config experiments/configs/final_cpu.py --out runs/cv \\
        --cache .cache/busi128 --set epochs=8

Rerunning the same command resumes: finished folds are kept, a killed fold resumes from
its checkpoint. After training, every fold model predicts the images it never trained on
(its test fold, and its validation part, which only early-stopped it):
``fold_i/predictions/oof.npz`` holds their ids, which part each came from, the
probability maps at the model's resolution (float16), the maps of the mirrored images
mirrored back, and the class probabilities. experiments/oof.py chooses the inference
recipe on them. ``--set`` overrides the recipe's config (e.g. a shorter budget; say so
wherever the numbers are quoted). Writes ``cv_results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from unet_jax import metrics as M  # noqa: E402
from unet_jax._io import atomic_write  # noqa: E402
from unet_jax.config import load_config  # noqa: E402
from unet_jax.data import BusiDataset, cross_validation_splits, duplicate_groups, read_manifest, write_manifest  # noqa: E402,E501
from unet_jax.inference import load, predict_outputs, predict_probabilities  # noqa: E402
from unet_jax.layers.onednn import wanted  # noqa: E402
from unet_jax.models import apply_overrides  # noqa: E402
from unet_jax.train.cpu import cpu_device_count, use_cpu_devices  # noqa: E402
from unet_jax.train.loop import train  # noqa: E402
from unet_jax.train.run import load_run_data  # noqa: E402

SUMMARY = ("dice", "iou", "pixel_accuracy", "hd95")


def fold_manifests(config: Any, out: Path, k: int) -> list[Path]:
    """Write (once) the k manifests of the cross-validation splits of the config's data."""
    paths = [out / f"fold_{i}.split.json" for i in range(k)]
    if all(p.is_file() for p in paths):
        return paths
    dataset = load_run_data(config, out)
    ids, labels = list(dataset.ids), [int(x) for x in dataset.labels]
    splits = cross_validation_splits(
        ids, labels, duplicate_groups(dataset.hashes), k=k, val_fraction=config.val_fraction, seed=config.split_seed
    )
    for split, path in zip(splits, paths):
        write_manifest(split, path, dict(zip(ids, labels)))
    return paths


def save_oof(run: Path, manifest: Path, dataset: BusiDataset) -> Path:
    """Predict (once) the images fold model ``run`` never trained on: its test fold and its
    validation part. Writes ``run/predictions/oof.npz`` atomically and returns its path."""
    path = run / "predictions" / "oof.npz"
    if path.is_file():
        return path
    split = read_manifest(manifest)
    ids = [*split["test"], *split["val"]]
    parts = ["test"] * len(split["test"]) + ["val"] * len(split["val"])
    loaded = load(run)
    images = dataset.subset(ids).images_u8
    probs, classes = predict_outputs(loaded, images, flip_tta=False)
    mirrored = predict_probabilities(loaded, np.ascontiguousarray(images[:, :, ::-1]), loaded.config.eval_batch_size)[
        :, :, ::-1
    ]
    arrays = {
        "ids": np.asarray(ids),
        "parts": np.asarray(parts),
        "probs": probs.astype(np.float16),
        "probs_flip": np.ascontiguousarray(mirrored).astype(np.float16),
        "step": np.asarray(int(loaded.step_dir.name)),
    }
    if classes is not None:
        arrays["class_probs"] = classes.astype(np.float32)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def pooled(rows: list[dict[str, Any]], seed: int) -> dict[str, Any]:
    agg = M.aggregate(rows, n_boot=2000, seed=seed)
    out = {m: {g: agg[m][g] for g in agg[m]} for m in SUMMARY}
    out["normal_false_positive_rate"] = agg["normal_false_positive_rate"]
    out["lesion_empty_prediction_rate"] = agg["lesion_empty_prediction_rate"]
    out["counts"] = agg["counts"]
    return M.to_jsonable(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--only", type=int, nargs="*", default=None, help="run only these folds (then aggregate what exists)"
    )
    args = parser.parse_args(argv)

    config = apply_overrides(load_config(args.config), args.set + ([f"cache={args.cache}"] if args.cache else []))
    # Before anything starts JAX's backend: the CPU as two devices, as `unet-jax train` does.
    use_cpu_devices(
        cpu_device_count(
            config.cpu_devices,
            (config.batch_size, config.eval_batch_size),
            config.distributed,
            onednn=wanted(config.cpu_bf16),
        )
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifests = fold_manifests(config, out, args.folds)
    started = time.time()
    for i, manifest in enumerate(manifests):
        if args.only is not None and i not in args.only:
            continue
        run = out / f"fold_{i}"
        if (run / "results.json").is_file():
            continue
        print(f"fold {i + 1}/{args.folds}: training into {run}", file=sys.stderr, flush=True)
        train(dataclasses.replace(config, manifest=str(manifest.resolve())), run)
    dataset = None
    for i, manifest in enumerate(manifests):
        run = out / f"fold_{i}"
        if (run / "results.json").is_file() and not (run / "predictions" / "oof.npz").is_file():
            print(f"fold {i + 1}/{args.folds}: out-of-fold predictions", file=sys.stderr, flush=True)
            dataset = dataset or load_run_data(config, out)
            save_oof(run, manifest, dataset)
    rows: dict[str, list] = {"recipe": [], "raw": []}
    folds = []
    for i in range(args.folds):
        run = out / f"fold_{i}"
        if not (run / "results.json").is_file():
            continue
        results = json.loads((run / "results.json").read_text())
        per_image = json.loads((run / "predictions" / "test_per_image.json").read_text())
        raw_file = run / "predictions" / "test_per_image_raw.json"
        raw = json.loads(raw_file.read_text()) if raw_file.is_file() else per_image
        rows["recipe"] += per_image
        rows["raw"] += raw
        env = json.loads((run / "environment.json").read_text())
        folds.append(
            {
                "fold": i,
                "best_epoch": results["best_epoch"],
                "epochs_run": results["epochs_run"],
                "wall_time_s": env.get("wall_time_s"),
                "recipe": results.get("inference", {}).get("description"),
                "lesion_dice": results["test"]["dice"].get("lesion"),
                "lesion_iou": results["test"]["iou"].get("lesion"),
                "normal_false_positive_rate": results["test"]["normal_false_positive_rate"],
                "lesion_empty_prediction_rate": results["test"]["lesion_empty_prediction_rate"],
            }
        )
    report = {
        "config": args.config,
        "overrides": args.set,
        "folds_done": len(folds),
        "folds": folds,
        "pooled": pooled(rows["recipe"], config.seed) if rows["recipe"] else None,
        "pooled_raw": pooled(rows["raw"], config.seed) if rows["raw"] else None,
        "wall_time_this_call_s": time.time() - started,
    }
    (out / "cv_results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    return 0


def format_table(report: dict[str, Any]) -> str:
    lines = [
        "| fold | best epoch | lesion Dice | lesion IoU | normal FP rate | lesion empty rate | recipe |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in report["folds"]:
        lines.append(
            f"| {f['fold']} | {f['best_epoch']}/{f['epochs_run']} | {f['lesion_dice']:.3f} | "
            f"{f['lesion_iou']:.3f} | {f['normal_false_positive_rate']:.3f} | "
            f"{f['lesion_empty_prediction_rate']:.3f} | {f['recipe']} |"
        )
    for name in ("pooled", "pooled_raw"):
        p = report.get(name)
        if not p:
            continue
        d, i = p["dice"]["lesion"], p["iou"]["lesion"]
        nfp, le = p["normal_false_positive_rate"], p["lesion_empty_prediction_rate"]
        lines.append(
            f"| {name} ({p['counts'].get('overall', '?')} images) | | {d['mean']:.3f} [{d['ci_low']:.3f}, "
            f"{d['ci_high']:.3f}] | {i['mean']:.3f} [{i['ci_low']:.3f}, {i['ci_high']:.3f}] | "
            f"{nfp['rate']:.3f} [{nfp['ci_low']:.3f}, {nfp['ci_high']:.3f}] | "
            f"{le['rate']:.3f} [{le['ci_low']:.3f}, {le['ci_high']:.3f}] | |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
