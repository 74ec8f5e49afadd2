"""Good and bad cases side by side: a model's predictions on a run's test split.

    python3 experiments/cases.py --checkpoint runs/final_cpu --run runs/final_cpu \\
        --data ../shared/data --out experiments/results/final_cpu/cases.png

Predictions use the checkpoint's inference recipe at native resolution. The grid shows
the lesion images with the highest and the lowest Dice, then normal images (green: ground
truth, red: prediction); the caption of each cell gives its id, class and Dice.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unet_jax import metrics as M  # noqa: E402
from unet_jax.data import read_manifest  # noqa: E402
from unet_jax.evaluate import read_for_evaluation  # noqa: E402
from unet_jax.inference import load, predict_outputs, recipe_mask  # noqa: E402
from unet_jax.plots import prediction_grid  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run, checkpoint or exported model folder")
    parser.add_argument("--run", required=True, help="the run folder whose split.json names the test images")
    parser.add_argument("--data", required=True, help="the BUSI-layout folder the split was made from")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--per-side", type=int, default=4, help="best and worst lesion images shown")
    args = parser.parse_args(argv)

    loaded = load(args.checkpoint)
    test_ids = list(read_manifest(Path(args.run) / "split.json")["test"])
    dataset = read_for_evaluation(loaded, args.data).subset(test_ids)
    probs, classes = predict_outputs(loaded, dataset.images_u8, loaded.recipe.flip_tta)
    rows = []
    for i in range(len(dataset)):
        gt = dataset.original_masks[i]
        pred = recipe_mask(probs[i], None if classes is None else classes[i], loaded.recipe, gt.shape)
        rows.append((i, M.dice(pred, gt), pred, gt))
    lesion = sorted((r for r in rows if r[3].any()), key=lambda r: -r[1])
    normal = [r for r in rows if not r[3].any()]
    k = args.per_side
    marked = [r for r in normal if r[2].any()][:2]
    shown = lesion[:k] + lesion[-k:] + ([r for r in normal if not r[2].any()][:2]) + marked
    images = [
        np.asarray(
            Image.fromarray(dataset.images_u8[i][..., 0]).resize((gt.shape[1], gt.shape[0]), Image.Resampling.BILINEAR)
        )
        for i, _, _, gt in shown
    ]
    titles = [f"{dataset.ids[i]} ({dataset.class_names[i]}) Dice {d:.2f}" for i, d, _, _ in shown]
    prediction_grid(
        images, [r[3] for r in shown], [r[2] for r in shown], args.out, titles=titles, ncols=4, max_items=len(shown)
    )
    print(
        f"wrote {args.out}: {len(lesion[:k])} best, {len(lesion[-k:])} worst lesion images, "
        f"{len(shown) - 2 * k} normal images ({len(marked)} of them marked)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
