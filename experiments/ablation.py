"""The ablation table of issue 10 from finished run folders: validation numbers only.

    python3 experiments/ablation.py runs/final_cpu [experiments/results/base_cpu ...]

For every run: its validation Dice at the best epoch (all validation images, training
resolution, as monitored) and CPU wall minutes; for runs that chose an inference recipe
(``inference.json``), one row per post-processing lever added alone to the raw model and
the chosen combination, at native resolution on the validation split: lesion Dice, normal
false-positive rate, lesion images predicted empty. Test-split numbers are never used here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unet_jax import metrics as M


def training_row(run: Path) -> str:
    results = json.loads((run / "results.json").read_text())
    env = json.loads((run / "environment.json").read_text())
    val = results.get("val_at_best_epoch", {})
    return (
        f"| {run.name} | {results['best_epoch']}/{results['epochs_run']} | "
        f"{val.get('val/dice', float('nan')):.3f} | "
        f"{val.get('val/accuracy', float('nan')):.3f} | {env.get('wall_time_s', float('nan')) / 60:.0f} |"
    )


def lever_rows(run: Path) -> list[str]:
    path = run / "inference.json"
    if not path.is_file():
        return []
    report = json.loads(path.read_text())["validation"]
    rows = [
        ("raw model output (threshold 0.5)", report["raw"]),
        *report["levers"].items(),
        ("chosen recipe", report["chosen"]),
    ]
    return [
        f"| {run.name} | {name} | {s['lesion_dice']:.3f} | "
        f"{M.rate_cell(s.get('normal_false_positive'), s['normal_false_positive_rate'])} | "
        f"{M.rate_cell(s.get('lesion_empty'), s['lesion_empty_rate'])} | {s['dice_all']:.3f} |"
        for name, s in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    print("| run | best epoch | val Dice (all images) | val class accuracy | wall min |")
    print("|---|---|---|---|---|")
    for run in runs:
        print(training_row(run))
    print()
    print(
        "| run | lever (validation, native resolution) | lesion Dice | normal FP rate | lesion empty rate | "
        "Dice, all images |"
    )
    print("|---|---|---|---|---|---|")
    for run in runs:
        for row in lever_rows(run):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
