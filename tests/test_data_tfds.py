"""The `busi` TFDS builder: build from phantom fixtures, read back with tfds.data_source."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

# tensorflow-datasets is a declared dependency: a missing install must fail, not skip
import tensorflow_datasets  # noqa: E402,F401
from _data_helpers import make_phantom

from unet_jax.data import ReadOptions, load_busi


def test_build_and_read_round_trip(tmp_path):
    import tensorflow_datasets as tfds

    from unet_jax.data.tfds_busi import build, data_source

    root = make_phantom(tmp_path / "p").root
    build(root, tmp_path / "tfds", resolution=128)
    assert list((tmp_path / "tfds" / "busi" / "r128" / "1.0.0").glob("*.array_record-*"))
    src = data_source(tmp_path / "tfds", resolution=128)
    same = tfds.data_source("busi/r128", split="train", data_dir=str(tmp_path / "tfds"))
    assert len(src) == len(same)
    ref = load_busi(root, ReadOptions(size=(128, 128), keep_original=False))
    assert len(src) == len(ref)
    got = {}
    for i in range(len(src)):
        ex = src[i]
        got[ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"]] = ex
    for k, id_ in enumerate(ref.ids):
        ex = got[id_]
        np.testing.assert_array_equal(ex["image"], ref.images_u8[k])
        np.testing.assert_array_equal(ex["mask"], ref.masks[k])
        assert ex["label"] == ref.labels[k]
        np.testing.assert_array_equal(ex["original_size"], ref.original_sizes[k])
    assert "tensorflow" not in sys.modules


def test_bad_resolution(tmp_path):
    from unet_jax.data.tfds_busi import build

    with pytest.raises(ValueError, match="resolution"):
        build(tmp_path, tmp_path / "out", resolution=100)


def test_importing_the_package_does_not_import_tfds():
    code = (
        "import sys, unet_jax, unet_jax.data, unet_jax.data.augment, unet_jax.data.cache; "
        "assert 'tensorflow_datasets' not in sys.modules, 'tfds imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
