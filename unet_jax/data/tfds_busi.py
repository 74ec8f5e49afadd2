"""A ``busi`` TensorFlow Datasets builder that works without TensorFlow.

Build once from a BUSI-layout folder (manual download), in ``array_record`` files, then read
with random access::

    from unet_jax.data.tfds_busi import build, data_source
    build("../shared/data", data_dir="~/tfds", resolution=256)
    train = data_source("~/tfds", resolution=256)        # or tfds.data_source("busi/r256")
    ex = train[0]  # {"image": uint8 (256, 256, 1), "mask": uint8 (256, 256, 1), "label": int,
                   #  "id": bytes, "original_size": int32 (2,)}

Examples come from the same reader as everything else (:func:`unet_jax.data.busi.load_busi`),
so validation, the mask union and the resizing are identical. Images and masks are stored as
raw uint8 tensors (``tfds.features.Tensor``), which need no TensorFlow to encode or decode.
The builder has one split, "train" (all images); train/val/test come from a split manifest
(unet_jax.data.splits) applied by id.

This module imports tensorflow_datasets at import time; ``unet_jax`` and ``unet_jax.data``
never import it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from unet_jax.data.busi import CLASSES, ReadOptions, load_busi

__all__ = ["Busi", "BusiConfig", "build", "data_source"]

RESOLUTIONS = (128, 256, 512)


class BusiConfig(tfds.core.BuilderConfig):
    """One resolution (square, height = width); grayscale (1 channel)."""

    def __init__(self, *, resolution: int, **kwargs):
        super().__init__(
            name=f"r{resolution}", description=f"images and union masks resized to {resolution}x{resolution}", **kwargs
        )
        self.resolution = resolution


class Busi(tfds.core.GeneratorBasedBuilder):
    """Breast Ultrasound Images (BUSI), Al-Dhabyani et al. 2020; masks as union of files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Union of all mask files per image; native size kept."}
    BUILDER_CONFIGS = [BusiConfig(resolution=r) for r in RESOLUTIONS]
    DEFAULT_CONFIG_NAME = "r256"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Download the BUSI dataset (Dataset_BUSI_with_GT: folders benign/, malignant/, normal/
    with `name (N).png` and `name (N)_mask[_K].png`) and pass its folder (or its parent) as
    the manual directory: download_config=tfds.download.DownloadConfig(manual_dir=PATH).
    """

    # tfds 4.9.10 derives code_path via `importlib_resources`, a package it only declares for
    # Python < 3.9; giving the path directly avoids needing it.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "id": tfds.features.Text(),
                    "image": tfds.features.Tensor(shape=(r, r, 1), dtype=np.uint8),
                    "mask": tfds.features.Tensor(shape=(r, r, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                    "original_size": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                }
            ),
            supervised_keys=("image", "mask"),
            homepage="https://doi.org/10.1016/j.dib.2019.104863",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        return {"train": self._generate_examples(Path(dl_manager.manual_dir))}

    def _generate_examples(self, root: Path):
        r = self.builder_config.resolution
        ds = load_busi(root, ReadOptions(size=(r, r), keep_original=False))
        for i, id_ in enumerate(ds.ids):
            yield (
                id_,
                {
                    "id": id_,
                    "image": ds.images_u8[i],
                    "mask": ds.masks[i],
                    "label": int(ds.labels[i]),
                    "original_size": ds.original_sizes[i].astype(np.int32),
                },
            )


def build(source: str | os.PathLike, data_dir: str | os.PathLike, resolution: int = 256) -> Busi:
    """Build the ``busi/r{resolution}`` dataset from a BUSI folder into ``data_dir``."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {resolution}")
    builder = Busi(config=f"r{resolution}", data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(source)))
    return builder


def data_source(data_dir: str | os.PathLike, resolution: int = 256, split: str = "train"):
    """Random-access source (``len``, ``[i]`` -> dict of numpy values) of a built dataset."""
    return tfds.data_source(f"busi/r{resolution}", split=split, data_dir=os.fspath(data_dir))
