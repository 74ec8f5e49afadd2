"""On-device augmentation and sampling; the host-side batch iterator."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _data_helpers import make_phantom

from unet_jax.data import ReadOptions, load_busi
from unet_jax.data.augment import AugmentConfig, augment_batch, host_batches, make_sampler, to_device

GEOMETRY_ONLY = AugmentConfig(
    hflip=0.5, vflip=0.5, max_rotation_deg=15.0, scale=(0.8, 1.2), brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0)
)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = make_phantom(tmp_path_factory.mktemp("aug") / "p").root
    return load_busi(root, ReadOptions(size=(32, 32), keep_original=False))


@pytest.fixture(scope="module")
def device_data(ds):
    return to_device(ds)


@pytest.fixture(scope="module")
def sampler(ds):
    return make_sampler(6, len(ds))


def test_batch_shapes_ranges_and_determinism(sampler, device_data):
    key = jax.random.key(0)
    b = sampler(device_data, key, 0)
    assert b.images.shape == (6, 32, 32, 1) and b.images.dtype == jnp.float32
    assert b.masks.shape == (6, 32, 32, 1) and b.masks.dtype == jnp.float32
    assert float(b.images.min()) >= 0.0 and float(b.images.max()) <= 1.0
    assert set(np.unique(np.asarray(b.masks)).tolist()) <= {0.0, 1.0}
    again = sampler(device_data, jax.random.key(0), 0)
    np.testing.assert_array_equal(np.asarray(b.images), np.asarray(again.images))
    np.testing.assert_array_equal(np.asarray(b.masks), np.asarray(again.masks))
    other = sampler(device_data, key, 1)
    assert not np.array_equal(np.asarray(b.index), np.asarray(other.index))
    np.testing.assert_array_equal(np.asarray(b.labels), np.asarray(device_data.labels)[np.asarray(b.index)])


def test_epoch_is_a_permutation(sampler, device_data, ds):
    steps = len(ds) // 6
    seen = np.concatenate([np.asarray(sampler(device_data, jax.random.key(3), s).index) for s in range(steps)])
    assert len(set(seen.tolist())) == len(seen) == steps * 6
    nxt = np.concatenate(
        [np.asarray(sampler(device_data, jax.random.key(3), s).index) for s in range(steps, 2 * steps)]
    )
    assert not np.array_equal(seen, nxt)  # reshuffled


def test_identity_config(ds, device_data):
    b = make_sampler(4, len(ds), AugmentConfig.none())(device_data, jax.random.key(1), 0)
    idx = np.asarray(b.index)
    np.testing.assert_allclose(np.asarray(b.images), ds.images[idx], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(b.masks), ds.masks_f32[idx])


def test_hflip_is_exact(ds):
    cfg = AugmentConfig(
        hflip=1.0, max_rotation_deg=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=(1.0, 1.0), gamma=(1.0, 1.0)
    )
    img, msk = augment_batch(jax.random.key(0), jnp.asarray(ds.images[:3]), jnp.asarray(ds.masks[:3]), cfg)
    np.testing.assert_allclose(np.asarray(img), ds.images[:3, :, ::-1], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(msk), ds.masks_f32[:3, :, ::-1])


def test_same_geometry_for_image_and_mask(ds):
    # feed the mask as the image: with photometric changes off both must warp identically
    m = jnp.asarray(ds.masks_f32)
    img, msk = jax.jit(augment_batch, static_argnums=3)(jax.random.key(7), m, m, GEOMETRY_ONLY)
    np.testing.assert_array_equal(np.asarray(img) >= 0.5, np.asarray(msk) == 1.0)
    assert float(jnp.abs(img - m).max()) > 0.5  # something did move


def test_uint8_input_and_photometric(ds):
    cfg = AugmentConfig(hflip=0.0, max_rotation_deg=0.0, scale=(1.0, 1.0))
    img, msk = augment_batch(jax.random.key(2), jnp.asarray(ds.images_u8[:4]), jnp.asarray(ds.masks[:4]), cfg)
    np.testing.assert_array_equal(np.asarray(msk), ds.masks_f32[:4])  # geometry off
    assert float(jnp.abs(img - ds.images[:4]).max()) > 0.01
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


def test_sampler_refuses_data_of_another_size(ds, device_data):
    # jax would clamp the out-of-range gather indices: silently repeated examples
    with pytest.raises(
        ValueError,
        match=rf"num_examples={len(ds) + 5}\) but the data holds "
        rf"{len(ds)}",
    ):
        make_sampler(4, len(ds) + 5)(device_data, jax.random.key(0), 0)
    with pytest.raises(ValueError, match="num_rows 3 < num_examples 4"):
        make_sampler(4, 4, num_rows=3)


def test_padding_rows_after_the_examples_are_never_drawn(ds, device_data):
    # A dataset sharded over processes is padded to a multiple of the device count.
    n = len(ds) - 6
    sample = make_sampler(4, n, None, num_rows=len(ds))
    drawn = np.concatenate(
        [np.asarray(sample(device_data, jax.random.key(0), step).index) for step in range(3 * (n // 4))]
    )
    assert drawn.max() < n and len(set(drawn.tolist())) == 4 * (n // 4)


def test_no_host_to_device_copy_per_step(sampler, device_data):
    # the "no per-step host-to-device copies": with the data, key and step already
    # on the device, drawing a batch must not move anything from the host
    key = jax.device_put(jax.random.key(0))
    steps = [jax.device_put(np.int32(s)) for s in range(3)]
    sampler(device_data, key, steps[0])  # compile outside the guard
    with jax.transfer_guard_host_to_device("disallow"):
        for step in steps:
            jax.block_until_ready(sampler(device_data, key, step))


def test_sampler_validates_batch_size():
    with pytest.raises(ValueError, match="batch_size"):
        make_sampler(0, 10)
    with pytest.raises(ValueError, match="batch_size"):
        make_sampler(11, 10)


@pytest.mark.parametrize("use_grain", [True, False])
def test_host_batches(ds, use_grain):
    batches = list(host_batches(ds, 5, seed=1, num_epochs=2, use_grain=use_grain))
    per_epoch = len(ds) // 5
    assert len(batches) == 2 * per_epoch
    b = batches[0]
    assert b["image"].shape == (5, 32, 32, 1) and b["image"].dtype == np.uint8
    assert b["mask"].shape == (5, 32, 32, 1) and b["label"].dtype == np.int32
    again = list(host_batches(ds, 5, seed=1, num_epochs=2, use_grain=use_grain))
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(batches, again))
    tail = list(host_batches(ds, 5, seed=1, num_epochs=1, drop_remainder=False, use_grain=use_grain))
    assert sum(len(x["label"]) for x in tail) == len(ds)
    assert sorted(np.concatenate([x["label"] for x in tail]).tolist()) == sorted(ds.labels.tolist())
