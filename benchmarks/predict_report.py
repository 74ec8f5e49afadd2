"""``unet-jax predict`` per image, with and without ``report.html`` (issue 21's Results).

    python -m benchmarks.predict_report --busi ../shared/data [--windows 5] [--out FILE]
    python -m benchmarks.predict_report IMAGE... [--windows 5] [--out FILE]

Inputs: the given images, or with ``--busi`` the first 4 benign, 3 malignant and 3 normal
images of a BUSI folder (natural order of their numbers, masks left out). The bundled model
is loaded once (its start-up is not per image). Timed (harness.time_windows: ``--windows``
windows after one untimed warm-up call, medians):

  predict_s_per_image  predict_files (masks, overlays, predictions.csv/json), no report
  report_s_per_image   write_prediction_report on its rows (thumbnails, report.html)
  with_report_s_per_image = their sum: what `unet-jax predict` costs per image by default

and the report's size. Writes benchmarks/results/predict_report_cpu.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
from pathlib import Path

from benchmarks.harness import REPO, environment, time_windows, write_result
from unet_jax.data.busi import resolve_root
from unet_jax.inference import load
from unet_jax.predict import predict_files
from unet_jax.report import write_prediction_report

BUSI_PICK = (("benign", 4), ("malignant", 3), ("normal", 3))


def busi_images(path: str) -> list[Path]:
    """The first images of each class in :data:`BUSI_PICK`, by their number."""
    root = resolve_root(path)

    def number(p: Path) -> int:
        m = re.search(r"\((\d+)\)$", p.stem)
        return int(m[1]) if m else 0

    picked = []
    for cls, n in BUSI_PICK:
        images = sorted((p for p in (root / cls).glob("*.png") if "_mask" not in p.name), key=number)
        picked += images[:n]
    return picked


def measure(inputs: list[Path], windows: int) -> dict:
    loaded = load(None)
    with tempfile.TemporaryDirectory(prefix="unet-jax-bench-") as tmp:
        out = Path(tmp) / "pred"
        rows: list[dict] = []

        def predict(_: int) -> None:
            rows[:] = [r.row() for r in predict_files(loaded, inputs, out)]

        def report(_: int) -> None:
            write_prediction_report(rows, out)

        predict(1), report(1)  # warm-up: compilation, file-system caches
        predict_s = time_windows(predict, 1, windows)
        report_s = time_windows(report, 1, windows)
        size = (out / "report.html").stat().st_size
    n = len(inputs)
    p, r = statistics.median(predict_s) / n, statistics.median(report_s) / n
    return {
        "inputs": [str(i) for i in inputs],
        "images": n,
        "windows": windows,
        "predict_s_per_image": p,
        "report_s_per_image": r,
        "with_report_s_per_image": p + r,
        "report_share": r / (p + r),
        "report_bytes": size,
        "predict_window_s": predict_s,
        "report_window_s": report_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="*")
    parser.add_argument("--busi", default=None, help="a BUSI folder: 4 benign, 3 malignant, 3 normal images")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "predict_report_cpu.json"))
    args = parser.parse_args()
    inputs = [Path(p) for p in args.images] or (busi_images(args.busi) if args.busi else [])
    if not inputs:
        parser.error("give images, or --busi PATH")
    result = measure(inputs, args.windows)
    result["command"] = "python -m benchmarks.predict_report " + (
        f"--busi {args.busi}" if args.busi and not args.images else "IMAGE..."
    )
    result["environment"] = environment(None, None)
    write_result(args.out, result)
    print(
        f"{result['images']} images: predict {result['predict_s_per_image']:.3f} s/image, report "
        f"{result['report_s_per_image']:.3f} s/image ({100 * result['report_share']:.0f}% of "
        f"{result['with_report_s_per_image']:.3f} s), report.html {result['report_bytes'] / 1e6:.2f} MB -> {args.out}"
    )


if __name__ == "__main__":
    main()
