"""Duplicate-aware stratified splits, k-fold, the seed protocol and the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _data_helpers import make_phantom

from unet_jax.data import (
    ReadOptions,
    Split,
    duplicate_groups,
    hamming_distances,
    image_hash,
    kfold_split,
    load_busi,
    read_manifest,
    seed_protocol,
    stratified_split,
    write_manifest,
)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = make_phantom(tmp_path_factory.mktemp("splits") / "p", duplicates=4).root
    return load_busi(root, ReadOptions(size=(16, 16), keep_original=False))


@pytest.fixture(scope="module")
def synthetic():
    """300 ids in 3 unbalanced classes with 40 planted groups (some spanning classes)."""
    rng = np.random.default_rng(0)
    ids = [f"{c} ({n})" for c, k in (("benign", 150), ("malignant", 100), ("normal", 50)) for n in range(1, k + 1)]
    labels = [0] * 150 + [1] * 100 + [2] * 50
    perm = rng.permutation(300)
    groups = [tuple(int(x) for x in perm[i : i + s]) for i, s in zip(range(0, 120, 3), rng.integers(2, 4, size=40))]
    return ids, labels, groups


def _where(split: Split) -> dict[str, str]:
    return {x: name for name, ids in split.partitions.items() for x in ids}


def test_hash_and_distances():
    rng = np.random.default_rng(1)
    a = (rng.random((60, 70)) * 255).astype(np.uint8)
    h = image_hash(a)
    assert 0 <= h < 2**63
    assert image_hash(a) == h and image_hash(a[:, :, None]) == h
    assert image_hash(np.repeat(a[:, :, None], 3, axis=2)) == h
    d = hamming_distances([h, h ^ 0b1011, 0])
    assert d.tolist() == [
        [0, 3, bin(h).count("1")],
        [3, 0, bin(h ^ 0b1011).count("1")],
        [bin(h).count("1"), bin(h ^ 0b1011).count("1"), 0],
    ]
    with pytest.raises(ValueError, match="shape"):
        image_hash(np.zeros((2, 2, 2, 2)))


def test_duplicate_groups_union_find():
    # a-b within 2 bits, b-c within 2 bits, a-c 4 bits: one group by transitivity
    hashes = [0b0000, 0b0011, 0b1111, 0xFF << 40]
    assert duplicate_groups(hashes, threshold=2) == [(0, 1, 2)]
    assert duplicate_groups(hashes, threshold=1) == []
    for bad in (-1, 64, 2.5):
        with pytest.raises(ValueError, match=rf"threshold .* 0..63, got {bad}"):
            duplicate_groups(hashes, threshold=bad)


def test_phantom_duplicates_found(ds):
    groups = [{ds.ids[i] for i in g} for g in duplicate_groups(ds.hashes)]
    assert len(groups) >= 2 and any(len({x.split(" ")[0] for x in g}) > 1 for g in groups)


def test_stratified_deterministic_and_complete(synthetic):
    ids, labels, groups = synthetic
    a = stratified_split(ids, labels, groups, seed=3)
    assert a == stratified_split(
        list(reversed(ids)), list(reversed(labels)), [tuple(ids[i] for i in g) for g in groups], seed=3
    )
    assert a != stratified_split(ids, labels, groups, seed=4)
    all_ids = [x for p in a.partitions.values() for x in p]
    assert sorted(all_ids) == sorted(ids)  # disjoint and complete


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stratified_proportions_and_groups(synthetic, seed):
    ids, labels, groups = synthetic
    split = stratified_split(ids, labels, groups, seed=seed)
    where = _where(split)
    for g in groups:
        assert len({where[ids[i]] for i in g}) == 1
    counts = split.counts(dict(zip(ids, labels)))
    for c, n in (("benign", 150), ("malignant", 100), ("normal", 50)):
        for part, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
            assert abs(counts[part][c] - frac * n) <= 3.5, (part, c, counts)


def test_split_on_phantom_keeps_groups(ds):
    groups = duplicate_groups(ds.hashes)
    assert groups  # the loop below must not be vacuous
    split = stratified_split(ds.ids, ds.labels, groups, seed=0)
    where = _where(split)
    for g in split.duplicate_groups:
        assert len({where[x] for x in g}) == 1
    assert len(split.duplicate_groups) == len(groups)


def test_kfold(synthetic):
    ids, labels, groups = synthetic
    kf = kfold_split(ids, labels, groups, k=5, seed=0)
    assert kf.k == 5 and kf == kfold_split(ids, labels, groups, k=5, seed=0)
    where = _where(kf)
    assert len(where) == len(ids)
    for g in groups:
        assert len({where[ids[i]] for i in g}) == 1
    sizes = [len(kf[f"fold_{i}"]) for i in range(5)]
    assert max(sizes) - min(sizes) <= 6
    for i in range(5):
        f = kf.fold(i)
        assert set(f["val"]) == set(kf[f"fold_{i}"])
        assert set(f["train"]) | set(f["val"]) == set(ids)
        assert not set(f["train"]) & set(f["val"])
    with pytest.raises(ValueError, match="out of range"):
        kf.fold(5)
    with pytest.raises(ValueError, match="k must be"):
        kfold_split(ids, labels, groups, k=1)


def test_kfold_refuses_more_folds_than_units():
    # 5 images, two of them one duplicate group: 4 units, so a 5th fold would be empty
    ids = [f"benign ({n})" for n in range(1, 6)]
    labels = [0] * 5
    assert all(
        kfold_split(ids, labels, [(0, 1)], k=4, seed=s).partitions[f"fold_{i}"] for s in range(3) for i in range(4)
    )
    with pytest.raises(ValueError, match=r"k=5 folds need at least k units.*expected k <= 4"):
        kfold_split(ids, labels, [(0, 1)], k=5)


def test_seed_protocol(synthetic):
    ids, labels, _ = synthetic
    s = seed_protocol(ids, labels, seed=7)
    assert s == seed_protocol(ids, labels, seed=7) != seed_protocol(ids, labels, seed=8)
    c = s.counts(dict(zip(ids, labels)))
    assert c["train"] == {"benign": 120, "malignant": 80, "normal": 0}
    assert c["test"] == {"benign": 30, "malignant": 20, "normal": 0}


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("duplicate_groups", 3, "a list of lists of ids"),
        ("duplicate_groups", [["a", 1]], "a list of lists of ids"),
        ("duplicate_groups", ["ab"], "a list of lists of ids"),
        ("seed", "1", "an integer"),
        ("seed", True, "an integer"),
        ("protocol", None, "a string"),
        ("params", [], "an object"),
    ],
)
def test_a_hand_edited_manifest_field_is_a_clear_error(synthetic, tmp_path, key, value, expected):
    ids, labels, groups = synthetic
    path = write_manifest(stratified_split(ids, labels, groups, seed=1), tmp_path / "split.json")
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"split manifest '.*split.json': '{key}' is .*; expected {expected}"):
        read_manifest(path)


def test_fraction_validation(synthetic):
    ids, labels, groups = synthetic
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(ids, labels, groups, {"train": 0.5, "test": 0.2})


def test_manifest_round_trip_and_errors(synthetic, tmp_path):
    ids, labels, groups = synthetic
    split = stratified_split(ids, labels, groups, seed=1)
    path = write_manifest(split, tmp_path / "m" / "split.json", dict(zip(ids, labels)), source="x")
    assert read_manifest(path) == split
    assert list(tmp_path.joinpath("m").iterdir()) == [path]  # no temp file left
    doc = json.loads(path.read_text())
    assert doc["counts"]["train"]["benign"] > 0 and doc["extra"] == {"source": "x"}
    doc["partitions"]["val"].append(doc["partitions"]["train"][0])
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="both"):
        read_manifest(path)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a split manifest"):
        read_manifest(path)
    with pytest.raises(ValueError, match="cannot read"):
        read_manifest(tmp_path / "missing.json")
