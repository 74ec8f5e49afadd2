"""`predict` per image for DICOM inputs against the same images as PNG (issue 21).

    python -m benchmarks.dicom_predict [--data ../shared/data] [--n 10] [--windows 3]

Takes the first ``--n`` BUSI images (sorted names over benign, then malignant), writes each
as an uncompressed DICOM (``unet_jax.data.dicom.write_dicom``: MONOCHROME2 for a grayscale
PNG, RGB for an RGB one, so the pixels are the PNG's), then times
``unet_jax.predict.predict_files`` with the bundled model on the PNGs, on the DICOMs, and on
the DICOMs with ``output_format="dicom-seg"`` (the masks, overlays, table, and for the last
a SEG each). The model is loaded once and each case called once untimed (compilation,
highdicom's import); the result is the median over ``--windows`` timed calls, divided by
``--n``. Also: decoding alone (PIL vs pydicom), per image, median of the same windows, and
building and writing the SEGs alone (highdicom), and whether every DICOM mask equals its
PNG's. Writes benchmarks/results/dicom_predict_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.harness import REPO, environment, time_windows, write_result
from unet_jax.data.busi import resolve_root
from unet_jax.data.dicom import read_dicom, write_dicom
from unet_jax.data.dicom_seg import write_seg
from unet_jax.inference import load
from unet_jax.predict import predict_files


def _images(data: str, n: int) -> list[Path]:
    root = resolve_root(data)
    found = [p for cls in ("benign", "malignant") for p in sorted((root / cls).glob("* (*).png"))]
    return found[:n]


def _to_dicom(png: Path, out: Path) -> Path:
    with Image.open(png) as im:
        rgb = im.mode != "L"
        pixels = np.asarray(im.convert("RGB" if rgb else "L"))
    return write_dicom(out / (png.stem + ".dcm"), pixels[None], photometric="RGB" if rgb else "MONOCHROME2")


def _median_s(run, windows: int) -> float:
    run()  # untimed: compilation, warm-up, imports
    return statistics.median(time_windows(lambda _: run(), 1, windows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "dicom_predict_cpu.json"))
    args = parser.parse_args()
    pngs = _images(args.data, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "dcm").mkdir()
        dicoms = [_to_dicom(p, tmp / "dcm") for p in pngs]
        t0 = time.perf_counter()
        loaded = load(None)
        load_s = time.perf_counter() - t0
        cases = {"png": (pngs, "png"), "dicom": (dicoms, "png"), "dicom_seg": (dicoms, "dicom-seg")}
        per_image = {
            name: _median_s(
                lambda i=inputs, f=fmt, o=tmp / name: predict_files(loaded, i, o, output_format=f), args.windows
            )
            / len(pngs)
            for name, (inputs, fmt) in cases.items()
        }

        def read_png() -> None:
            for p in pngs:
                with Image.open(p) as im:
                    im.load()

        def read_dcm() -> None:
            for p in dicoms:
                read_dicom(p)

        masks = [np.asarray(Image.open(tmp / "dicom" / f"{p.stem}_mask.png")) > 0 for p in pngs]
        headers = [read_dicom(p).dataset for p in dicoms]

        def seg_only() -> None:
            for n, (ds, mask) in enumerate(zip(headers, masks, strict=True)):
                write_seg(ds, mask[None], tmp / f"seg{n}.dcm")

        decode = {"png": _median_s(read_png, args.windows), "dicom": _median_s(read_dcm, args.windows)}
        seg_s = _median_s(seg_only, args.windows)
        same = [
            np.array_equal(
                np.asarray(Image.open(tmp / "png" / f"{p.stem}_mask.png")),
                np.asarray(Image.open(tmp / "dicom" / f"{p.stem}_mask.png")),
            )
            for p in pngs
        ]
    result = {
        "command": "python -m benchmarks.dicom_predict " + f"--n {args.n} --windows {args.windows}",
        "images": [p.name for p in pngs],
        "model_load_s": round(load_s, 2),
        "predict_s_per_image": {k: round(v, 4) for k, v in per_image.items()},
        "decode_ms_per_image": {k: round(v / len(pngs) * 1e3, 2) for k, v in decode.items()},
        "seg_build_and_write_ms_per_image": round(seg_s / len(pngs) * 1e3, 2),
        "dicom_masks_equal_png_masks": f"{sum(same)} of {len(same)}",
        "load_average_1_5_15": [round(x, 1) for x in os.getloadavg()],
        "note": "2-core CPU shared with other jobs (a background training run); medians of --windows calls",
        "environment": environment(None, None),
    }
    write_result(args.out, result)
    shown = ("predict_s_per_image", "decode_ms_per_image", "seg_build_and_write_ms_per_image", "load_average_1_5_15")
    print({k: result[k] for k in (*shown, "dicom_masks_equal_png_masks")})


if __name__ == "__main__":
    main()
