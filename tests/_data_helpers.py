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
