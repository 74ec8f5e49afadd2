"""The BUSI reader: layout, union masks, preprocessing, every bad-input case, shared data."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from _data_helpers import COUNTS, SIZE, copy_tree, make_phantom
from PIL import Image

from unet_jax.data import CLASSES, DatasetError, ReadOptions, load_busi, read_mask, scan, validate
from unet_jax.data.busi import check_dataset, mask_problem


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return make_phantom(tmp_path_factory.mktemp("busi") / "phantom")


@pytest.fixture(scope="module")
def dataset(phantom):
    return load_busi(phantom.root, ReadOptions(size=(32, 48)))


@pytest.fixture
def bad_copy(phantom, tmp_path):
    return copy_tree(phantom.root, tmp_path / "copy")


def test_counts_ids_and_shapes(dataset, phantom):
    assert len(dataset) == sum(COUNTS.values())
    assert dataset.class_counts() == COUNTS
    assert set(dataset.ids) == {i for v in phantom.ids.values() for i in v}
    assert dataset.images_u8.shape == (len(dataset), 32, 48, 1)
    assert dataset.masks.shape == (len(dataset), 32, 48, 1)
    images = dataset.images
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(images * 255, dataset.images_u8.astype(np.float32))
    assert set(np.unique(dataset.masks).tolist()) <= {0, 1}
    assert all(tuple(s) == SIZE for s in dataset.original_sizes)
    assert [CLASSES[k] for k in dataset.labels] == [i.rsplit(" (", 1)[0] for i in dataset.ids]


def test_union_of_masks_and_original_masks(dataset, phantom):
    assert set(dataset.merged_ids()) == set(phantom.multi_mask) and phantom.multi_mask
    for id_ in phantom.multi_mask:
        i = dataset.ids.index(id_)
        cls = id_.rsplit(" (", 1)[0]
        files = [Path(phantom.root, cls, f) for f in dataset.mask_files[i]]
        masks = [read_mask(Image.open(f)) for f in files]
        union = np.logical_or.reduce(masks)
        np.testing.assert_array_equal(dataset.original_masks[i], union)
        assert all(union.sum() > m.sum() for m in masks)  # each file adds a lesion
    for i, cls in enumerate(dataset.class_names):
        assert (dataset.original_masks[i].any()) == (cls != "normal")
        assert dataset.original_masks[i].shape == SIZE


def test_mask_modes_all_binary(phantom):
    # the phantom writes the three mask encodings of the public files
    modes = {Image.open(p).mode for p in phantom.root.rglob("*_mask*.png")}
    assert modes == {"1", "RGB", "RGBA"}


def _encode(mask: np.ndarray, mode: str) -> Image.Image:
    """``mask`` (bool) as a PNG-mode image: lesion white (or max value) on black."""
    gray = Image.fromarray(mask.astype(np.uint8) * np.uint8(255), mode="L")
    if mode == "I;16":
        return Image.fromarray(mask.astype(np.uint16) * np.uint16(65535))
    if mode == "P":
        return gray.convert("P")
    return gray.convert("1") if mode == "1" else gray.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_read_mask_every_mode_gives_the_same_binary_mask(mode, tmp_path):
    truth = np.zeros((6, 7), bool)
    truth[1:4, 2:6] = True
    truth[5, 0] = True
    path = tmp_path / "m.png"
    _encode(truth, mode).save(path)  # through a real PNG file, as the reader sees it
    with Image.open(path) as im:
        got = read_mask(im)
    assert got.dtype == bool
    np.testing.assert_array_equal(got, truth)


def test_read_mask_rgba_transparent_is_background():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2, :, :3] = 255  # white
    rgba[:, :, 3] = 255
    rgba[0, :, 3] = 0  # white but transparent
    got = read_mask(Image.fromarray(rgba, "RGBA"))
    assert got.tolist() == [[False] * 4, [True] * 4, [False] * 4, [False] * 4]


def _recode(mask: np.ndarray, how: str) -> Image.Image:
    """``mask`` (bool) in one of the binary encodings the reader must accept alike."""
    m = mask.astype(np.uint8)
    if how == "L 0/1":
        return Image.fromarray(m, "L")
    if how == "RGB red":
        return Image.fromarray(np.stack([m * 200, m * 0, m * 0], -1), "RGB")
    if how == "RGBA white on transparent":  # colour everywhere; only alpha says lesion
        return Image.fromarray(np.dstack([np.full((*m.shape, 3), 255, np.uint8), m * 255]), "RGBA")
    assert how == "RGB 0/1"
    return Image.fromarray(np.repeat(m[:, :, None], 3, -1), "RGB")


@pytest.mark.parametrize("how", ["L 0/1", "RGB red", "RGBA white on transparent", "RGB 0/1"])
def test_every_binary_encoding_reads_as_the_same_mask(dataset, bad_copy, how):
    # a folder whose masks are all saved as 0/1 (or a red lesion on black) read as empty
    truth = {}
    for p in bad_copy.rglob("*_mask*.png"):
        truth[p] = read_mask(Image.open(p))
        _recode(truth[p], how).save(p)
    ds = load_busi(bad_copy, ReadOptions(size=(32, 48)))
    np.testing.assert_array_equal(ds.masks, dataset.masks)
    for a, b in zip(ds.original_masks, dataset.original_masks):
        np.testing.assert_array_equal(a, b)
    assert sum(m.any() for m in truth.values()) > 10
    assert check_dataset(bad_copy).ok


@pytest.mark.parametrize(
    "values, reason",
    [
        ("all 255", "every pixel as lesion"),
        ("all 1", "every pixel as lesion"),
        ("128 and 255", "every pixel as lesion"),
        ("anti-aliased", "not two-level"),
        ("alpha edge", "not two-level"),
    ],
)
def test_mask_that_is_not_a_binary_lesion_mask_is_a_problem(bad_copy, values, reason):
    p = bad_copy / "benign" / "benign (2)_mask.png"
    m = read_mask(Image.open(p))
    u8, edge = m.astype(np.uint8) * np.uint8(255), np.roll(m, 1, 0) ^ m
    arr = {
        "all 255": np.full(m.shape, 255, np.uint8),
        "all 1": np.ones(m.shape, np.uint8),
        "128 and 255": np.where(m, 255, 128).astype(np.uint8),
        "anti-aliased": np.where(edge, 128, u8),
    }.get(values)
    if values == "alpha edge":
        alpha = np.where(edge, 200, u8).astype(np.uint8)  # a half-opaque rim
        Image.fromarray(np.dstack([np.full((*m.shape, 3), 255, np.uint8), alpha]), "RGBA").save(p)
    else:
        Image.fromarray(arr.astype(np.uint8), "L").save(p)
    rep = check_dataset(bad_copy)
    assert not rep.ok and [x.path for x in rep.problems] == [str(p)]
    assert reason in rep.problems[0].reason
    _expect(bad_copy, "benign (2)_mask.png", reason)


def test_real_busi_mask_encodings_pass(tmp_path):
    # the public files: 1-bit, 0/255 RGB (normal: all black) and opaque 0/255 RGBA
    m = np.zeros((9, 11), bool)
    m[2:5, 3:8] = True
    for k, im in enumerate(
        [
            Image.fromarray(m).convert("1"),
            Image.fromarray(np.zeros((9, 11, 3), np.uint8), "RGB"),
            Image.fromarray(
                np.dstack([np.repeat(m[:, :, None] * np.uint8(255), 3, -1), np.full((9, 11), 255, np.uint8)]), "RGBA"
            ),
        ]
    ):
        im.save(tmp_path / f"{k}.png")
        with Image.open(tmp_path / f"{k}.png") as back:
            assert mask_problem(back) is None
            assert read_mask(back).sum() == (0 if k == 1 else m.sum())


def test_three_channels_and_native_size(phantom):
    ds = load_busi(phantom.root, ReadOptions(size=SIZE, channels=3))
    assert ds.images_u8.shape[1:] == (*SIZE, 3)
    # at native size the resized mask is the original mask
    for m, om in zip(ds.masks, ds.original_masks):
        np.testing.assert_array_equal(m[:, :, 0], om)


def test_resized_mask_matches_original_roughly(dataset):
    # resizing keeps a mask binary and (at a coarser grid) roughly the same area fraction
    for m, om in zip(dataset.masks, dataset.original_masks):
        assert abs(m.mean() - om.mean()) < 0.05


def test_options_validated():
    with pytest.raises(ValueError, match="channels"):
        ReadOptions(channels=2)
    with pytest.raises(ValueError, match=r"size must be \(height, width\) or None, got 256"):
        ReadOptions(size=256)
    with pytest.raises(ValueError, match="positive entries, got \\(0, 5\\)"):
        ReadOptions(size=(0, 5))
    with pytest.raises(ValueError, match="on_error"):
        ReadOptions(on_error="ignore")


# ---- bad input ------------------------------------------------------------------------
def _expect(root: Path, *fragments: str) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        load_busi(root, ReadOptions(size=(16, 16)))
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    return info.value


def test_missing_mask(bad_copy):
    (bad_copy / "benign" / "benign (3)_mask.png").unlink()
    err = _expect(bad_copy, "benign (3).png", "missing mask")
    assert len(err.problems) == 1


def test_mask_size_differs(bad_copy):
    p = bad_copy / "malignant" / "malignant (2)_mask.png"
    Image.open(p).resize((10, 12)).save(p)
    _expect(bad_copy, "malignant (2)_mask.png", "mask size 10x12", "80x64")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_unreadable_png(bad_copy, how):
    p = bad_copy / "benign" / "benign (2).png"
    data = p.read_bytes()
    p.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a png" * 10, "empty": b""}[how])
    _expect(bad_copy, "benign (2).png", "unreadable image")


def test_truncated_mask(bad_copy):
    p = bad_copy / "normal" / "normal (1)_mask.png"
    p.write_bytes(p.read_bytes()[:40])
    _expect(bad_copy, "normal (1)_mask.png", "unreadable image")


@pytest.mark.parametrize("cut", [1, 12, 20])
@pytest.mark.parametrize("name", ["benign/benign (2).png", "malignant/malignant (3)_mask.png"])
def test_png_cut_inside_its_last_bytes_is_truncated(bad_copy, cut, name):
    # PIL decodes these without complaint (the pixels are complete); only the missing
    # IEND trailer shows the file was cut short
    p = bad_copy / name
    p.write_bytes(p.read_bytes()[:-cut])
    err = _expect(bad_copy, Path(name).name, "truncated PNG")
    assert len(err.problems) == 1


def test_content_that_is_not_png(bad_copy):
    p = bad_copy / "benign" / "benign (5).png"
    Image.open(p).convert("RGB").save(p, format="JPEG")
    _expect(bad_copy, "benign (5).png", "not a PNG file", "JPEG")


def test_16_bit_image_is_refused_not_clipped(bad_copy):
    p = bad_copy / "benign" / "benign (6).png"
    Image.fromarray(np.full((SIZE[0], SIZE[1]), 40000, np.uint16)).save(p)
    _expect(bad_copy, "benign (6).png", "unsupported image mode 'I;16'")


NO_PATTERN = "file name matches no pattern"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("notes.txt", NO_PATTERN),
        ("benign 5.png", NO_PATTERN),
        ("benign (7).jpg", NO_PATTERN),
        ("benign (1)_mask_x.png", NO_PATTERN),
        ("Benign (3).png", NO_PATTERN),
        # a leading zero would silently share the id of "benign (1)"
        ("benign (01).png", NO_PATTERN),
        ("benign (1)_mask_01.png", NO_PATTERN),
        ("malignant (99).png", "file of class 'malignant' inside the 'benign' folder"),
    ],
)
def test_file_matching_no_pattern(bad_copy, name, reason):
    (bad_copy / "benign" / name).write_bytes(b"x")
    err = _expect(bad_copy, name)
    assert [(Path(p.path).name, reason in p.reason) for p in err.problems] == [(name, True)]


def test_orphan_mask_and_extra_without_main(bad_copy):
    shutil.copy(bad_copy / "benign" / "benign (1)_mask.png", bad_copy / "benign" / "benign (50)_mask.png")
    (bad_copy / "benign" / "benign (4)_mask.png").rename(bad_copy / "benign" / "benign (4)_mask_1.png")
    _expect(bad_copy, "mask without its image", "benign (4).png", "has only")


def test_missing_and_empty_class_folder(bad_copy):
    shutil.rmtree(bad_copy / "normal")
    for f in (bad_copy / "malignant").iterdir():
        f.unlink()
    err = _expect(bad_copy, "normal: missing class folder", "malignant: class folder holds no images")
    assert len(err.problems) == 2


def test_every_problem_in_one_error_and_skip_mode(bad_copy):
    (bad_copy / "benign" / "benign (3)_mask.png").unlink()
    (bad_copy / "malignant" / "malignant (1).png").write_bytes(b"")
    (bad_copy / "normal" / "README").write_text("hi")
    err = _expect(bad_copy, "benign (3).png", "malignant (1).png", "README")
    assert len(err.problems) == 3
    assert validate(bad_copy) == list(err.problems)
    ds = load_busi(bad_copy, ReadOptions(size=(16, 16), on_error="skip"))
    assert len(ds) == sum(COUNTS.values()) - 2
    assert "benign (3)" not in ds.ids and "malignant (1)" not in ds.ids
    assert {Path(p.path).name for p in ds.skipped} == {"benign (3).png", "malignant (1).png", "README"}


def test_nothing_left_is_an_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="missing class folder"):
        load_busi(tmp_path / "x", ReadOptions(size=(16, 16), on_error="skip"))
    with pytest.raises(ValueError, match="not a directory"):
        scan(tmp_path / "nope")


def test_check_report(phantom, bad_copy):
    rep = check_dataset(phantom.root)
    assert rep.ok and rep.images == COUNTS
    assert set(rep.merged_masks) == set(phantom.multi_mask)
    group_of = {x: k for k, g in enumerate(rep.duplicate_groups) for x in g}
    assert set(group_of) == {x for pair in phantom.duplicates for x in pair}
    assert all(group_of[a] == group_of[b] for a, b in phantom.duplicates)
    assert any(len({x.split(" ")[0] for x in g}) > 1 for g in rep.cross_class_groups)
    (bad_copy / "benign" / "benign (3)_mask.png").unlink()
    bad = check_dataset(bad_copy)
    assert not bad.ok and len(bad.problems) == 1


# ---- the shared data ------------------------------------------------------------------
def test_shared_busi(shared_busi):
    layout = scan(shared_busi)
    assert not layout.problems
    n_masks = {c: sum(len(r.mask_paths) for r in layout.records if r.class_name == c) for c in CLASSES}
    assert n_masks == {"benign": 364, "malignant": 168, "normal": 106}
    ds = load_busi(shared_busi, ReadOptions(size=(64, 64)))
    assert ds.class_counts() == {"benign": 350, "malignant": 168, "normal": 106}
    assert len(ds.merged_ids()) == 14 and all(i.startswith("benign") for i in ds.merged_ids())
    i = ds.ids.index("benign (100)")
    files = [read_mask(Image.open(shared_busi / "benign" / f)) for f in ds.mask_files[i]]
    assert len(files) == 2
    np.testing.assert_array_equal(ds.original_masks[i], files[0] | files[1])
    assert (files[0] | files[1]).sum() > max(files[0].sum(), files[1].sum())
    for k, cls in enumerate(ds.class_names):
        assert ds.original_masks[k].any() == (cls != "normal"), ds.ids[k]
        assert tuple(ds.original_sizes[k]) == ds.original_masks[k].shape
