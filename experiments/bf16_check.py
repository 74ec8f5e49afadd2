"""The bundled model's masks with its convolutions in bfloat16 on AMX (oneDNN, ``--cpu-bf16
on``) against float32, on every image of a BUSI folder (issue 32, item 3).

    python3 experiments/bf16_check.py --data ../shared/data --out experiments/results/bf16_check/bundle_masks.json

Both runs use the bundled model's tuned recipe at native resolution (as ``unet-jax
evaluate``) in one process on one CPU device. Per image: the Dice between the two final
masks (1 when both are empty), and each mask's Dice against the ground truth; the summary
holds the smallest agreement, how many images fall below 0.99, the lesion Dice and the
normal images left empty of each, and the wall time of each prediction pass (after one
warm-up batch compiled both programs). Target: Dice >= 0.99 on every image.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from unet_jax._io import atomic_write  # noqa: E402
from unet_jax.evaluate import evaluate_dataset, read_for_evaluation  # noqa: E402
from unet_jax.inference import load, with_cpu_bf16  # noqa: E402

TARGET = 0.99


def masks(loaded, dataset) -> tuple[dict[str, np.ndarray], list[dict], float]:
    """Each image's final mask, its row (metrics against the ground truth) and the wall time."""
    out: dict[str, np.ndarray] = {}
    evaluate_dataset(loaded, dataset.subset(dataset.ids[:2]), n_boot=0)  # compile outside the clock
    t0 = time.perf_counter()
    _, rows = evaluate_dataset(loaded, dataset, n_boot=0, on_case=lambda row, pred, _: out.__setitem__(row["id"], pred))
    return out, rows, time.perf_counter() - t0


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Dice between two boolean masks; 1 when both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def summary(rows: list[dict]) -> dict:
    lesion = [r["dice"] for r in rows if r["class"] != "normal"]
    normal_empty = [r["pred_area"] == 0 for r in rows if r["class"] == "normal"]
    return {"lesion_dice": float(np.mean(lesion)), "normals_left_empty": f"{sum(normal_empty)}/{len(normal_empty)}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder in the BUSI layout")
    parser.add_argument("--checkpoint", default=None, help="default: the bundled model")
    parser.add_argument("--out", required=True, help="JSON file")
    args = parser.parse_args(argv)
    f32 = load(args.checkpoint)
    bf16 = with_cpu_bf16(f32, "on")
    dataset = read_for_evaluation(f32, args.data)
    m32, rows32, s32 = masks(f32, dataset)
    m16, rows16, s16 = masks(bf16, dataset)
    dice = {i: agreement(m32[i], m16[i]) for i in dataset.ids}
    worst = sorted(dice.items(), key=lambda kv: kv[1])[:10]
    result = {
        "images": len(dice),
        "target": f"Dice >= {TARGET} between the float32 and bfloat16 masks on every image",
        "min_agreement": min(dice.values()),
        "below_target": sum(d < TARGET for d in dice.values()),
        "identical_masks": sum(bool(np.array_equal(m32[i], m16[i])) for i in dataset.ids),
        "worst": [{"id": i, "dice": d} for i, d in worst],
        "float32": {**summary(rows32), "predict_s": round(s32, 1)},
        "bfloat16": {**summary(rows16), "predict_s": round(s16, 1)},
        "per_image": dice,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1) + "\n"))
    print({k: v for k, v in result.items() if k != "per_image"})
    return 0 if result["below_target"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
