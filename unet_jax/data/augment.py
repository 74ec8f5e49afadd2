"""On-device augmentation and batch sampling (jitted, seeded), plus a host-side path.

The prepared BUSI data is small (624 x 256 x 256 uint8, ~40 MB), so the training input
pipeline keeps it resident on the accelerator (:func:`to_device`) and builds every batch
inside jitted code from ``(key, step)`` (:func:`make_sampler`): per-epoch shuffling,
gathering, /255 and augmentation, with no host worker and no host-to-device copy per step.
Because a batch is a pure function of (key, step), a resumed run sees the same batches.

Augmentations (:class:`AugmentConfig`): horizontal/vertical flips, small rotation and
scale (one affine warp, applied identically to image and mask; the mask is resampled
bilinearly and re-thresholded at 0.5 so it stays in {0, 1}), then brightness, contrast and
gamma on the image only.

For data that does not fit on the device, :func:`host_batches` iterates uint8 batches on
the host with grain (``grain.MapDataset``: per-epoch reshuffle from a seed) or, when grain
is not installed, a plain numpy iterator with the same order semantics; augment those
batches on device with :func:`augment_batch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.ndimage import map_coordinates

__all__ = [
    "AugmentConfig",
    "Batch",
    "DeviceData",
    "augment_batch",
    "augment_example",
    "host_batches",
    "make_sampler",
    "to_device",
]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms (all sampled uniformly; gamma log-uniformly).

    hflip/vflip: probabilities. Vertical flips are off by default: in ultrasound the skin
    is always at the top and shadows fall downward.
    """

    hflip: float = 0.5
    vflip: float = 0.0
    max_rotation_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.1  # additive delta in [-b, b]
    contrast: tuple[float, float] = (0.9, 1.1)  # factor about the image mean
    gamma: tuple[float, float] = (0.8, 1.25)

    @classmethod
    def none(cls) -> AugmentConfig:
        """Identity: no transform at all."""
        return cls(0.0, 0.0, 0.0, (1.0, 1.0), 0.0, (1.0, 1.0), (1.0, 1.0))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class DeviceData:
    """Device-resident dataset. images uint8 (N, H, W, C); masks uint8 (N, H, W, 1) in
    {0, 1}; labels int32 (N,)."""

    images: jax.Array
    masks: jax.Array
    labels: jax.Array

    def __len__(self) -> int:
        return int(self.images.shape[0])


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Batch:
    """images float32 (B, H, W, C) in [0, 1]; masks float32 (B, H, W, 1) in {0, 1};
    labels int32 (B,); index int32 (B,): positions in the DeviceData."""

    images: jax.Array
    masks: jax.Array
    labels: jax.Array
    index: jax.Array


def to_device(dataset: Any, indices: Sequence[int] | np.ndarray | None = None, device: Any = None) -> DeviceData:
    """Put a BusiDataset (or a subset given by integer indices) on ``device`` (a Device or
    Sharding; default: the default device), keeping uint8 to use 4x less memory."""
    idx = np.arange(len(dataset)) if indices is None else np.asarray(indices, dtype=np.int64)
    host = DeviceData(
        images=np.asarray(dataset.images_u8)[idx],
        masks=np.asarray(dataset.masks)[idx].astype(np.uint8),
        labels=np.asarray(dataset.labels)[idx].astype(np.int32),
    )
    return jax.device_put(host, device)


def _warp(channels_first: jax.Array, coords: jax.Array) -> jax.Array:
    """Bilinear resampling of (C, H, W) at coords (2, H, W); outside is 0."""
    return jax.vmap(lambda ch: map_coordinates(ch, [coords[0], coords[1]], order=1, mode="constant", cval=0.0))(
        channels_first
    )


def augment_example(
    key: jax.Array, image: jax.Array, mask: jax.Array, config: AugmentConfig = AugmentConfig()
) -> tuple[jax.Array, jax.Array]:
    """Augment one example. image float32 (H, W, C) in [0, 1]; mask (H, W, 1) in {0, 1}.

    Returns (image, mask) of the same shapes: image in [0, 1], mask float32 in {0, 1}.
    """
    h, w = image.shape[0], image.shape[1]
    k = jax.random.split(key, 8)
    flip_x = jnp.where(jax.random.uniform(k[0]) < config.hflip, -1.0, 1.0)
    flip_y = jnp.where(jax.random.uniform(k[1]) < config.vflip, -1.0, 1.0)
    theta = jnp.deg2rad(config.max_rotation_deg) * jax.random.uniform(k[2], minval=-1.0, maxval=1.0)
    scale = jax.random.uniform(k[3], minval=config.scale[0], maxval=config.scale[1])
    # output pixel -> source pixel: inverse of (flip . scale . rotation) about the centre
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy, jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij")
    yy, xx = yy * flip_y, xx * flip_x
    cos, sin = jnp.cos(theta) / scale, jnp.sin(theta) / scale
    src = jnp.stack([cos * yy - sin * xx + cy, sin * yy + cos * xx + cx])
    img = jnp.moveaxis(_warp(jnp.moveaxis(image.astype(jnp.float32), -1, 0), src), 0, -1)
    msk = jnp.moveaxis(_warp(jnp.moveaxis(mask.astype(jnp.float32), -1, 0), src), 0, -1)
    msk = (msk >= 0.5).astype(jnp.float32)

    lo, hi = math.log(config.gamma[0]), math.log(config.gamma[1])
    gamma = jnp.exp(jax.random.uniform(k[4], minval=lo, maxval=hi))
    contrast = jax.random.uniform(k[5], minval=config.contrast[0], maxval=config.contrast[1])
    bright = config.brightness * jax.random.uniform(k[6], minval=-1.0, maxval=1.0)
    img = jnp.clip(img, 0.0, 1.0) ** gamma
    img = (img - jnp.mean(img)) * contrast + jnp.mean(img) + bright
    return jnp.clip(img, 0.0, 1.0), msk


def augment_batch(
    key: jax.Array, images: jax.Array, masks: jax.Array, config: AugmentConfig = AugmentConfig()
) -> tuple[jax.Array, jax.Array]:
    """Augment a batch, each example with its own key. images (B, H, W, C) float in
    [0, 1] or uint8 (then /255 first); masks (B, H, W, 1) in {0, 1}. Jit-friendly; jit it
    with ``config`` static (it is hashable)."""
    if images.dtype == jnp.uint8:
        images = images.astype(jnp.float32) / 255.0
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, i, m: augment_example(k, i, m, config))(keys, images, masks)


def make_sampler(
    batch_size: int, num_examples: int, config: AugmentConfig | None = AugmentConfig(), num_rows: int | None = None
) -> Callable[[DeviceData, jax.Array, jax.Array | int], Batch]:
    """A jitted ``sample(data, key, step) -> Batch`` drawing batches on device.

    Precondition: ``len(data) == num_rows`` (default ``num_examples``; checked when
    ``sample`` is traced). Rows past ``num_examples`` are padding (a dataset sharded over
    processes is padded to a multiple of the device count) and are never drawn.
    Epoch ``e = step // (N // batch_size)`` visits a permutation drawn from
    ``fold_in(key_perm, e)`` without replacement (the last N % batch_size examples of each
    permutation are dropped); augmentation uses ``fold_in(key_aug, step)``. config None:
    no augmentation (only /255).
    """
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"batch_size must be in 1..{num_examples} (the dataset size), got {batch_size}")
    steps_per_epoch = num_examples // batch_size
    num_rows = num_examples if num_rows is None else num_rows
    if num_rows < num_examples:
        raise ValueError(
            f"num_rows {num_rows} < num_examples {num_examples}; expected the data to hold "
            f"every example (and optionally padding after them)"
        )

    @jax.jit
    def sample(data: DeviceData, key: jax.Array, step: jax.Array | int) -> Batch:
        # Shapes are static under jit, so this runs once per trace. Without it a mismatch
        # is silent: jax clamps out-of-range gather indices (num_examples too large) or
        # never visits the tail of the data (too small).
        if data.images.shape[0] != num_rows:
            raise ValueError(
                f"sampler was made for {num_rows} rows (num_examples={num_examples}) but "
                f"the data holds {data.images.shape[0]} examples"
            )
        step = jnp.asarray(step, dtype=jnp.int32)
        key_perm, key_aug = jax.random.split(key)
        perm = jax.random.permutation(jax.random.fold_in(key_perm, step // steps_per_epoch), num_examples)
        start = (step % steps_per_epoch) * batch_size
        idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size).astype(jnp.int32)
        images = data.images[idx].astype(jnp.float32) / 255.0
        masks = data.masks[idx].astype(jnp.float32)
        if config is not None:
            images, masks = augment_batch(jax.random.fold_in(key_aug, step), images, masks, config)
        return Batch(images, masks, data.labels[idx], idx)

    return sample


# ---- host path ------------------------------------------------------------------------
def _numpy_order(n: int, seed: int, num_epochs: int | None) -> Iterator[int]:
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
        yield from np.random.default_rng([seed, epoch]).permutation(n).tolist()
        epoch += 1


def _grain() -> Any:
    """The grain module, or None where it is not installed."""
    try:
        import grain  # deferred: an optional dependency (the `grain` extra) that takes 3.5 s to import
    except ImportError:
        return None
    return grain


def host_batches(
    source: Any,
    batch_size: int,
    seed: int = 0,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    use_grain: bool | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled uint8 batches on the host, for data too large for the device.

    source: a BusiDataset, or any random-access sequence of dicts with "image" uint8
    (H, W, C), "mask" uint8 (H, W, 1) and "label" (e.g. a ``tfds.data_source``).
    Yields {"image": (B, H, W, C) uint8, "mask": (B, H, W, 1) uint8, "label": (B,) int32};
    reshuffled each epoch from ``seed``. use_grain: None = grain when importable.
    """
    if hasattr(source, "images_u8"):
        ds = source
        source = [{"image": ds.images_u8[i], "mask": ds.masks[i], "label": ds.labels[i]} for i in range(len(ds))]

    def collate(items: Sequence[dict]) -> dict[str, np.ndarray]:
        return {
            "image": np.stack([np.asarray(x["image"], np.uint8) for x in items]),
            "mask": np.stack([np.asarray(x["mask"], np.uint8) for x in items]),
            "label": np.asarray([int(x["label"]) for x in items], np.int32),
        }

    grain = _grain() if use_grain in (None, True) else None
    if use_grain and grain is None:
        raise ValueError("use_grain=True, but grain is not installed; expected `pip install unet-jax[grain]`")
    if grain is not None:
        pipe = grain.MapDataset.source(source).shuffle(seed=seed)
        pipe = pipe.repeat(num_epochs).batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
        yield from iter(pipe)
        return
    batch: list[dict] = []
    for i in _numpy_order(len(source), seed, num_epochs):
        batch.append(source[i])
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and not drop_remainder:
        yield collate(batch)
