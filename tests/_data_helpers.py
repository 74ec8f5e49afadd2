"""Shared helpers for the tests/test_data_*.py modules (generated phantom fixtures)."""

from __future__ import annotations

import shutil
from pathlib import Path

from unet_jax.data.phantom import PhantomInfo, write_phantom

SHARED_BUSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "Dataset_BUSI_with_GT"

COUNTS = {"benign": 10, "malignant": 8, "normal": 4}
SIZE = (64, 80)


def make_phantom(root: Path, duplicates: int = 3, seed: int = 0) -> PhantomInfo:
    """A small phantom: 22 images of 64x80, some multi-mask, ``duplicates`` near-copies."""
    return write_phantom(root, COUNTS, size=SIZE, seed=seed, duplicates=duplicates, multi_mask_fraction=0.3)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def make_cache_pair(tmp: Path, size: tuple[int, int] = (16, 16)) -> tuple[Path, Path]:
    """A phantom with one colour-annotated image (a red square drawn on a grey PNG, as a few
    BUSI images have), prepared as a grayscale and an RGB cache: (gray, rgb)."""
    import numpy as np
    from PIL import Image

    from unet_jax.data import ReadOptions
    from unet_jax.data.cache import prepare

    info = write_phantom(tmp / "phantom", {"benign": 3, "malignant": 2, "normal": 1}, size=(32, 32), seed=1)
    first = sorted((info.root / "benign").glob("* (1).png"))[0]
    rgb = np.array(Image.open(first).convert("RGB"))
    rgb[4:12, 4:12] = (255, 0, 0)
    Image.fromarray(rgb).save(first)
    gray, colour = tmp / "gray", tmp / "rgb"
    prepare(info.root, gray, ReadOptions(size=size))
    prepare(info.root, colour, ReadOptions(size=size, channels=3))
    return gray, colour
