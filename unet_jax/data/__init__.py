"""BUSI data: reading, validation, duplicate-aware splits, cache, phantom data, augmentation.

``unet_jax.data.tfds_busi`` (the TensorFlow Datasets builder) is not imported here, so that
``import unet_jax`` never needs tensorflow_datasets.
"""

from unet_jax.data.augment import (
    AugmentConfig,
    Batch,
    DeviceData,
    augment_batch,
    augment_example,
    host_batches,
    make_sampler,
    to_device,
)
from unet_jax.data.busi import (
    CLASSES,
    BusiDataset,
    CheckReport,
    IMAGE_MODES,
    DatasetError,
    Example,
    ImageRecord,
    Layout,
    Problem,
    ReadOptions,
    check_dataset,
    load_busi,
    preprocess_image,
    read_example,
    read_mask,
    resolve_root,
    scan,
    validate,
)
from unet_jax.data.cache import load_cache, prepare, save_cache
from unet_jax.data.phantom import PhantomInfo, phantom_image, write_phantom
from unet_jax.data.splits import (
    DUPLICATE_THRESHOLD,
    Split,
    duplicate_groups,
    hamming_distances,
    image_hash,
    kfold_split,
    read_manifest,
    seed_protocol,
    stratified_split,
    write_manifest,
)

__all__ = [
    "AugmentConfig",
    "Batch",
    "BusiDataset",
    "CLASSES",
    "CheckReport",
    "DUPLICATE_THRESHOLD",
    "DatasetError",
    "IMAGE_MODES",
    "DeviceData",
    "Example",
    "ImageRecord",
    "Layout",
    "Problem",
    "ReadOptions",
    "Split",
    "augment_batch",
    "augment_example",
    "check_dataset",
    "duplicate_groups",
    "hamming_distances",
    "host_batches",
    "image_hash",
    "kfold_split",
    "load_busi",
    "make_sampler",
    "preprocess_image",
    "read_example",
    "read_manifest",
    "read_mask",
    "resolve_root",
    "scan",
    "seed_protocol",
    "stratified_split",
    "to_device",
    "validate",
    "write_manifest",
]
