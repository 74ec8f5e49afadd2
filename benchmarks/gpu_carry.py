"""The one folder that `bash benchmarks/gpu_run.sh` needs beside the repository on the
device machine, packed under the device tool's 64 MiB limit (working tree included).

    unet-jax data prepare ../shared/data --out .cache/busi256 --size 256
    unet-jax data prepare ../shared/data --out .cache/busi256_rgb --size 256 --channels 3
    python3 -m benchmarks.gpu_carry pack .cache/busi256 .cache/busi256_rgb --out .gpu
    run(command="bash benchmarks/gpu_run.sh", carry=[".gpu"], timeout_s=600)

``.gpu/`` holds

* ``wheels/``: the runtime dependencies that the device image lacks (:data:`DEVICE_MISSING`,
  read from its package list in the device tool's KINDS.md on 2026-12-04), at the versions
  installed here, for CPython 3.12 on manylinux x86-64. Without them every stage failed
  there with ``No module named 'pydicom'`` (the first H200 run, 2026-12-04);
* ``busi256/``: the grayscale cache, as written by ``data prepare``;
* ``busi256_rgb.residual.npz`` and ``busi256_rgb.index.json``: the RGB cache as its
  difference (mod 256) from the grayscale one repeated three times. BUSI's RGB PNGs are
  grey but for a few annotation pixels, so this deflates to ~0.3 MB where the RGB cache
  itself takes 36 MB: the working tree (25 MB with the bundled model) and both caches
  would be 85 MB.

On the device ``gpu_run.sh`` installs the wheels into a private folder and calls
``python3 -m benchmarks.gpu_carry unpack .gpu``, which rebuilds ``.gpu/busi256_rgb/``
bit for bit (the round trip is tested).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

from unet_jax._io import check_target, new_temp_dir, swap_in

# Runtime dependencies (pyproject.toml) missing from the device image (its package list in
# /work/.library/device/KINDS.md); pyjpegls is highdicom's.
DEVICE_MISSING = ("pydicom", "highdicom", "pyjpegls", "tensorboardX")
DEVICE_PYTHON = "3.12"
DEVICE_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
GRAY, RGB = "busi256", "busi256_rgb"
RESIDUAL, RGB_INDEX = f"{RGB}.residual.npz", f"{RGB}.index.json"
SAME_ARRAYS = ("masks_bits", "original_bits")


def _cache(folder: Path, channels: int) -> tuple[dict, dict[str, np.ndarray]]:
    index_path, arrays_path = folder / "index.json", folder / "arrays.npz"
    if not (index_path.is_file() and arrays_path.is_file()):
        raise ValueError(
            f"{str(folder)!r} is not a data cache (no index.json and arrays.npz); expected `data prepare`'s output"
        )
    index = json.loads(index_path.read_text())
    got = index.get("options", {}).get("channels")
    if got != channels:
        raise ValueError(f"{str(index_path)!r}: options.channels is {got!r}; expected {channels}")
    with np.load(arrays_path) as z:
        return index, {k: z[k] for k in z.files}


def rgb_residual(gray: Path, rgb: Path) -> tuple[np.ndarray, dict]:
    """The RGB cache's ``images_delta`` minus the grayscale one's, repeated over three
    channels (uint8, mod 256), and the RGB index. Raises ValueError (naming the folder) if
    the two caches do not hold the same images, masks and size."""
    gray_index, g = _cache(gray, 1)
    rgb_index, r = _cache(rgb, 3)
    for key in ("ids", "shape"):
        a, b = gray_index.get(key), rgb_index.get(key)
        if key == "shape":
            a, b = (a or [None])[:-1], (b or [None])[:-1]
        if a != b:
            raise ValueError(f"{str(rgb)!r}: {key} differs from {str(gray)!r}'s; expected the same dataset and size")
    for key in SAME_ARRAYS:
        if not np.array_equal(g[key], r[key]):
            raise ValueError(f"{str(rgb)!r}: {key} differs from {str(gray)!r}'s; expected the same masks")
    residual = r["images_delta"] - np.repeat(g["images_delta"], 3, axis=-1)  # uint8 wraps mod 256
    return residual, rgb_index


def download_wheels(dest: Path) -> list[str]:
    """pip-download :data:`DEVICE_MISSING` at this machine's versions for the device."""
    specs = [f"{name}=={metadata.version(name)}" for name in DEVICE_MISSING]
    platforms = [arg for p in DEVICE_PLATFORMS for arg in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(dest), *specs]
    subprocess.run(cmd, check=True)
    return specs


def _is_pack(folder: Path) -> bool:
    return (folder / RESIDUAL).is_file() and (folder / GRAY).is_dir()


def pack(gray: Path, rgb: Path, out: Path, wheels: bool = True) -> dict:
    """Write ``out`` (built in a hidden sibling, then renamed into place). An existing
    ``out`` is replaced only if it is empty or an earlier pack: any other folder, such as
    a cache or a dataset given by mistake, is refused and left as it was."""
    check_target(out, True, _is_pack, "gpu_carry pack (busi256/ and busi256_rgb.residual.npz)")
    residual, _ = rgb_residual(gray, rgb)
    tmp = new_temp_dir(out)
    try:
        shutil.copytree(gray, tmp / GRAY)
        np.savez_compressed(tmp / RESIDUAL, images_delta=residual)
        shutil.copyfile(rgb / "index.json", tmp / RGB_INDEX)
        specs = download_wheels(tmp / "wheels") if wheels else []
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"folder": str(out), "bytes": size, "wheels": specs}


def unpack(folder: Path) -> Path:
    """Rebuild ``folder/busi256_rgb/`` (written by this function alone) from the grayscale
    cache and the residual."""
    _, g = _cache(folder / GRAY, 1)
    with np.load(folder / RESIDUAL) as z:
        residual = z["images_delta"]
    if residual.shape[:-1] != g["images_delta"].shape[:-1] or residual.shape[-1] != 3:
        raise ValueError(
            f"{str(folder / RESIDUAL)!r}: shape {residual.shape} does not fit the grayscale cache's "
            f"{g['images_delta'].shape}; expected (N, H, W, 3) over the same images"
        )
    dest = folder / RGB
    tmp = new_temp_dir(dest)
    try:
        delta = np.repeat(g["images_delta"], 3, axis=-1) + residual  # uint8 wraps mod 256
        np.savez_compressed(tmp / "arrays.npz", images_delta=delta, **{k: g[k] for k in SAME_ARRAYS})
        shutil.copyfile(folder / RGB_INDEX, tmp / "index.json")
        swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_carry", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="here: write the carried folder")
    p.add_argument("gray", type=Path)
    p.add_argument("rgb", type=Path)
    p.add_argument("--out", type=Path, default=Path(".gpu"))
    p.add_argument("--no-wheels", action="store_true", help="leave the wheels out (no network)")
    u = sub.add_parser("unpack", help="on the device: rebuild the RGB cache")
    u.add_argument("folder", type=Path)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            info = pack(args.gray, args.rgb, args.out, wheels=not args.no_wheels)
            wheels = ", ".join(info["wheels"]) or "none"
            print(f"wrote {info['folder']}: {info['bytes'] / 2**20:.1f} MiB; wheels: {wheels}")
        else:
            print(f"rebuilt {unpack(args.folder)}")
    except (ValueError, OSError, subprocess.CalledProcessError) as e:
        print(f"gpu_carry: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
