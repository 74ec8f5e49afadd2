"""Duplicate-aware, seeded, stratified splits and their JSON manifest.

Near-duplicates (the same lesion cropped slightly differently; a few filed under two classes)
are found with a perceptual hash: the 63 lowest non-DC coefficients of the 2-D DCT of a
32x32 grayscale thumbnail, each compared with their median (pHash). Two images whose hashes
differ in at most ``threshold`` bits are linked and the connected components (union-find)
are the duplicate groups. On the shared BUSI data the pair count is flat between 6 and 12
bits and rises steeply after 14; the default, 10, sits in that plateau.

A group is assigned as a whole, so it never straddles train/validation/test or two folds.
Stratification is by class: units (a duplicate group or a single image), largest first,
go to the partition whose per-class deficit they fill best, so a group spanning classes
counts for each of its classes.

Protocols (``Split.protocol``):
- "stratified": train/val/test fractions per class (default 0.7/0.15/0.15), duplicate-aware.
- "kfold": k folds per class, duplicate-aware; ``Split.fold(i)`` gives train/val.
- "seed": the notebook's protocol: benign and malignant only, 80/20 per class, a plain
  per-class permutation (not duplicate-aware, as the notebook; kept to reproduce it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unet_jax._io import atomic_write
from unet_jax.config import TrainConfig

__all__ = [
    "make_split",
    "lesion_images_only",
    "DUPLICATE_THRESHOLD",
    "Split",
    "check_manifest_target",
    "check_threshold",
    "cross_validation_splits",
    "duplicate_groups",
    "fingerprint_changes",
    "hamming_distances",
    "image_fingerprints",
    "image_hash",
    "kfold_split",
    "manifest_fingerprints",
    "read_manifest",
    "seed_protocol",
    "stratified_split",
    "write_manifest",
]

DUPLICATE_THRESHOLD = 10
MANIFEST_FORMAT = "unet_jax.split"
MANIFEST_VERSION = 1
_CLASSES = ("benign", "malignant", "normal")  # same order as busi.CLASSES


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n): coefficients = D @ x."""
    k = np.arange(n, dtype=np.float64).reshape(n, 1)
    i = np.arange(n, dtype=np.float64).reshape(1, n)
    d = np.cos(np.pi * (2.0 * i + 1.0) * k / (2.0 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


_DCT32 = _dct_matrix(32)


def image_hash(image: np.ndarray) -> int:
    """64-bit perceptual hash (bit 63 always 0) of an image.

    image: uint8 (H, W), (H, W, 1) or (H, W, 3); colour is converted to luma.
    """
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[:, :, 0] if arr.shape[2] == 1 else np.asarray(Image.fromarray(arr.astype(np.uint8)).convert("L"))
    if arr.ndim != 2:
        raise ValueError(f"image_hash expects (H, W[, C]), got shape {arr.shape}")
    thumb = Image.fromarray(arr.astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR)
    coeffs = _DCT32 @ np.asarray(thumb, dtype=np.float64) @ _DCT32.T
    low = coeffs[:8, :8].reshape(64)[1:]  # drop DC: it only encodes mean brightness
    bits = low > np.median(low)
    return int(np.sum(bits.astype(np.uint64) << np.arange(63, dtype=np.uint64)))


def hamming_distances(hashes: Sequence[int] | np.ndarray) -> np.ndarray:
    """int32 (N, N) pairwise Hamming distances between 64-bit hashes."""
    h = np.asarray(hashes, dtype=np.uint64).reshape(-1)
    bits = ((h.reshape(-1, 1) >> np.arange(64, dtype=np.uint64).reshape(1, 64)) & np.uint64(1)).astype(np.uint8)
    # for 0/1 vectors: |a xor b| = |a| + |b| - 2 a.b
    ones = bits.sum(1, dtype=np.int32)
    dot = bits.astype(np.int32) @ bits.T.astype(np.int32)
    return ones.reshape(-1, 1) + ones.reshape(1, -1) - 2 * dot


def check_threshold(threshold: int) -> None:
    """Raise ValueError unless ``threshold`` is a number of hash bits in 0..63."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, np.integer)) or not (0 <= threshold < 64):
        raise ValueError(f"duplicate threshold must be an integer number of bits in 0..63, got {threshold!r}")


def duplicate_groups(hashes: Sequence[int] | np.ndarray, threshold: int = DUPLICATE_THRESHOLD) -> list[tuple[int, ...]]:
    """Groups (>= 2 members) of indices linked by Hamming distance <= threshold.

    threshold: bits, 0 <= threshold < 64. Returns sorted tuples of indices, sorted by their
    first index.
    """
    check_threshold(threshold)
    dist = hamming_distances(hashes)
    n = dist.shape[0]
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    ii, jj = np.nonzero(np.triu(dist <= threshold, k=1))
    for i, j in zip(ii.tolist(), jj.tolist()):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), []).append(i)
    return sorted((tuple(c) for c in comps.values() if len(c) > 1), key=lambda g: g[0])


# ---- splits ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Split:
    """Named partitions of example ids.

    partitions: "train"/"val"/"test" for "stratified", "train"/"test" for "seed",
    "fold_0".."fold_{k-1}" for "kfold". duplicate_groups: the id groups kept together.
    """

    protocol: str
    seed: int
    partitions: dict[str, tuple[str, ...]]
    params: dict = field(default_factory=dict)
    duplicate_groups: tuple[tuple[str, ...], ...] = ()

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name not in self.partitions:
            raise KeyError(f"split has no partition {name!r}; it has {sorted(self.partitions)}")
        return self.partitions[name]

    @property
    def k(self) -> int:
        return sum(1 for p in self.partitions if p.startswith("fold_"))

    def fold(self, i: int) -> Split:
        """For a k-fold split: train = all folds but i, val = fold i."""
        if self.protocol != "kfold":
            raise ValueError(f"fold() needs a 'kfold' split, this one is {self.protocol!r}")
        if not 0 <= i < self.k:
            raise ValueError(f"fold index {i} out of range for k={self.k}")
        train = tuple(x for j in range(self.k) if j != i for x in self.partitions[f"fold_{j}"])
        return Split(
            "kfold",
            self.seed,
            {"train": train, "val": self.partitions[f"fold_{i}"]},
            {**self.params, "fold": i},
            self.duplicate_groups,
        )

    def counts(self, labels_by_id: Mapping[str, int]) -> dict[str, dict[str, int]]:
        """Images per class in each partition."""
        out = {}
        for name, ids in self.partitions.items():
            lab = [labels_by_id[i] for i in ids]
            out[name] = {c: lab.count(k) for k, c in enumerate(_CLASSES)}
        return out


def _sort_key(id_: str) -> tuple:
    m = re.match(r"^(.*?)\s*\((\d+)\)$", id_)
    return (m.group(1), int(m.group(2)), "") if m else (id_, -1, id_)


def _units(
    ids: Sequence[str], labels: Sequence[int], groups: Sequence[Sequence[str]]
) -> list[tuple[tuple[str, ...], tuple[int, ...]]]:
    """(member ids, their labels) per unit: each duplicate group, then every other id, in
    an order that does not depend on the order of ``ids``."""
    label_of = dict(zip(ids, (int(x) for x in labels)))
    if len(label_of) != len(ids):
        raise ValueError("ids must be unique")
    seen: set[str] = set()
    units = []
    for g in sorted(
        (sorted((x for x in g if x in label_of), key=_sort_key) for g in groups),
        key=lambda m: _sort_key(m[0]) if m else ("", -1, ""),
    ):
        if not g:
            continue
        if seen.intersection(g):
            raise ValueError(f"duplicate groups overlap at {sorted(seen.intersection(g))}")
        seen.update(g)
        units.append((tuple(g), tuple(label_of[x] for x in g)))
    units += [((x,), (label_of[x],)) for x in sorted(ids, key=_sort_key) if x not in seen]
    return units


def _assign(
    unit_labels: list[tuple[int, ...]], fractions: Sequence[float], rng: np.random.Generator
) -> list[list[int]]:
    """Place units (largest first, random order among equal sizes) where they best fill
    the per-class deficits: score_p = sum_c n_c (target_pc - got_pc). A unit spanning
    classes thus counts for each of its classes."""
    frac = np.asarray(fractions, dtype=np.float64).reshape(-1, 1)
    n_classes = 1 + max((c for labs in unit_labels for c in labs), default=0)
    vecs = [np.bincount(np.asarray(labs), minlength=n_classes).astype(np.float64) for labs in unit_labels]
    total = np.sum(vecs, axis=0) if vecs else np.zeros(n_classes)
    target = frac * total.reshape(1, -1)
    got = np.zeros_like(target)
    parts: list[list[int]] = [[] for _ in fractions]
    # stable sort on size keeps the random order among equal sizes
    order = sorted(rng.permutation(len(unit_labels)).tolist(), key=lambda i: -len(unit_labels[i]))
    for i in order:
        p = int(np.argmax((target - got) @ vecs[i]))
        parts[p].append(i)
        got[p] += vecs[i]
    return parts


def _partition(
    ids: Sequence[str], labels: Sequence[int], groups: Sequence[Sequence[str]], fractions: Sequence[float], seed: int
) -> list[tuple[str, ...]]:
    """Units (each duplicate group, then every other id) assigned by :func:`_assign`."""
    units = _units(ids, labels, groups)
    placed = _assign([labs for _, labs in units], fractions, np.random.default_rng(seed))
    return [tuple(sorted((x for u in p for x in units[u][0]), key=_sort_key)) for p in placed]


def _named_groups(ids: Sequence[str], groups: Sequence[Sequence[int | str]]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(ids[int(x)] if not isinstance(x, str) else x for x in g) for g in groups)


def stratified_split(
    ids: Sequence[str],
    labels: Sequence[int],
    groups: Sequence[Sequence[int | str]] = (),
    fractions: Mapping[str, float] | None = None,
    seed: int = 0,
) -> Split:
    """Seeded split stratified by class; each duplicate group lands in one partition.

    ids, labels: one per example (labels index busi.CLASSES). groups: duplicate groups as
    ids or indices into ``ids`` (e.g. from :func:`duplicate_groups`). fractions: partition
    name -> fraction, summing to 1 (default train 0.7, val 0.15, test 0.15).
    """
    fractions = dict(fractions or {"train": 0.7, "val": 0.15, "test": 0.15})
    if any(v < 0 for v in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {fractions}")
    named = _named_groups(ids, groups)
    parts = _partition(ids, labels, named, list(fractions.values()), seed)
    return Split("stratified", int(seed), dict(zip(fractions, map(tuple, parts))), {"fractions": fractions}, named)


def kfold_split(
    ids: Sequence[str], labels: Sequence[int], groups: Sequence[Sequence[int | str]] = (), k: int = 5, seed: int = 0
) -> Split:
    """k stratified, duplicate-aware folds ("fold_0".."fold_{k-1}"); see Split.fold.

    Precondition: 2 <= k <= the number of units (duplicate groups plus ungrouped images),
    so that no fold is empty.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    named = _named_groups(ids, groups)
    n_units = len(_units(ids, labels, named))
    if k > n_units:
        raise ValueError(
            f"k={k} folds need at least k units, but the {len(ids)} images form "
            f"only {n_units} (duplicate groups count as one); expected k <= "
            f"{n_units}"
        )
    parts = _partition(ids, labels, named, [1.0 / k] * k, seed)
    return Split("kfold", int(seed), {f"fold_{i}": tuple(p) for i, p in enumerate(parts)}, {"k": k}, named)


def cross_validation_splits(
    ids: Sequence[str],
    labels: Sequence[int],
    groups: Sequence[Sequence[int | str]] = (),
    k: int = 5,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> list[Split]:
    """k train/val/test splits for cross-validating a whole recipe: split i tests on fold i
    of :func:`kfold_split` and carves a stratified, duplicate-aware validation part (for
    early stopping and choosing the inference recipe) out of the other folds. Every image
    is tested exactly once; no duplicate group straddles two partitions of a split."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    folds = kfold_split(ids, labels, groups, k=k, seed=seed)
    label_of = dict(zip(ids, labels))
    splits = []
    for i in range(k):
        rest = [x for j in range(k) if j != i for x in folds[f"fold_{j}"]]
        rest_set = set(rest)
        rest_groups = [[g for g in group if g in rest_set] for group in folds.duplicate_groups]
        inner = stratified_split(
            rest,
            [label_of[x] for x in rest],
            [g for g in rest_groups if len(g) > 1],
            {"train": 1 - val_fraction, "val": val_fraction},
            seed=seed + 1 + i,
        )
        splits.append(
            Split(
                "cross_validation",
                int(seed),
                {"train": inner["train"], "val": inner["val"], "test": folds[f"fold_{i}"]},
                {"k": k, "fold": i, "val_fraction": val_fraction},
                folds.duplicate_groups,
            )
        )
    return splits


def seed_protocol(ids: Sequence[str], labels: Sequence[int], seed: int = 0, train_fraction: float = 0.8) -> Split:
    """The notebook's protocol: benign and malignant only, per class a seeded permutation,
    the first round(0.8 n) to train and the rest to test. Not duplicate-aware."""
    rng = np.random.default_rng(seed)
    train: list[str] = []
    test: list[str] = []
    for label in (0, 1):  # benign, malignant
        members = sorted((i for i, lab in zip(ids, labels) if int(lab) == label), key=_sort_key)
        perm = rng.permutation(len(members))
        n_train = int(round(train_fraction * len(members)))
        train += [members[i] for i in perm[:n_train]]
        test += [members[i] for i in perm[n_train:]]
    return Split(
        "seed",
        int(seed),
        {"train": tuple(sorted(train, key=_sort_key)), "test": tuple(sorted(test, key=_sort_key))},
        {"train_fraction": train_fraction, "classes": ["benign", "malignant"]},
    )


# ---- manifest -------------------------------------------------------------------------
def write_manifest(
    split: Split, path: str | os.PathLike, labels_by_id: Mapping[str, int] | None = None, **extra
) -> Path:
    """Write the split as JSON (atomically: temp file then rename). ``extra`` is recorded
    under "extra" (e.g. the dataset root, the hash threshold)."""
    path = Path(path)
    doc = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "protocol": split.protocol,
        "seed": split.seed,
        "params": split.params,
        "partitions": {k: list(v) for k, v in split.partitions.items()},
        "duplicate_groups": [list(g) for g in split.duplicate_groups],
        "extra": extra,
    }
    if labels_by_id is not None:
        doc["counts"] = split.counts(labels_by_id)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=1)))


def check_manifest_target(path: str | os.PathLike, overwrite: bool) -> None:
    """Raise ValueError unless a manifest may be written to ``path``: it does not exist, or
    ``overwrite`` is set and it is a split manifest (as ``data phantom`` and ``data
    prepare`` replace only their own outputs: a mistyped ``--out`` must not destroy a file)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"output {str(path)!r} is a folder; expected a file path for the manifest "
            f"(e.g. {str(path / 'split.json')!r})"
        )
    if not path.exists():
        return
    if not overwrite:
        raise ValueError(f"output {str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
    if not _is_manifest(path):
        raise ValueError(f"refusing to replace {str(path)!r}: it is not a split manifest; choose another output file")


def _is_manifest(path: Path) -> bool:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT


def read_manifest(path: str | os.PathLike) -> Split:
    """Read a manifest written by :func:`write_manifest`; raises ValueError if malformed."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read split manifest {str(path)!r}: {err}") from err
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{str(path)!r} is not a split manifest (format != {MANIFEST_FORMAT!r})")
    if doc.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{str(path)!r}: manifest version {doc.get('version')!r}, expected {MANIFEST_VERSION}")
    parts = doc.get("partitions")
    if not isinstance(parts, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in parts.values()
    ):
        raise ValueError(f"{str(path)!r}: 'partitions' must map names to lists of ids")
    seen: dict[str, str] = {}
    for name, ids in parts.items():
        for x in ids:
            if x in seen:
                raise ValueError(f"{str(path)!r}: id {x!r} is in both {seen[x]!r} and {name!r}")
            seen[x] = name
    _check_manifest_fields(doc, path)
    return Split(
        doc["protocol"],
        int(doc["seed"]),
        {k: tuple(v) for k, v in parts.items()},
        dict(doc.get("params", {})),
        tuple(tuple(g) for g in doc.get("duplicate_groups", [])),
    )


def _check_manifest_fields(doc: dict, path: Path) -> None:
    """The fields besides 'partitions' (a hand-edited manifest: a clear error, not a
    TypeError): 'protocol' a string, 'seed' an integer, 'params' an object,
    'duplicate_groups' a list of lists of ids."""
    groups = doc.get("duplicate_groups", [])
    checks = [
        ("protocol", isinstance(doc.get("protocol"), str), "a string"),
        ("seed", isinstance(doc.get("seed"), int) and not isinstance(doc.get("seed"), bool), "an integer"),
        ("params", isinstance(doc.get("params", {}), dict), "an object"),
        (
            "duplicate_groups",
            isinstance(groups, list)
            and all(isinstance(g, list) and all(isinstance(x, str) for x in g) for g in groups),
            "a list of lists of ids",
        ),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(f"split manifest {str(path)!r}: {key!r} is {doc.get(key)!r}; expected {expected}")


# --------------------------------------------------------------------------------------
# Fingerprints of the images a split was made from (recorded in a run's split.json)
# --------------------------------------------------------------------------------------
def image_fingerprints(dataset, ids: Sequence[str]) -> dict[str, list]:
    """For each id of ``ids`` (of ``dataset``, a BusiDataset): ``[height, width,
    perceptual hash, content]``, the native size, :func:`image_hash` (hex) and the first 16
    hex digits of the SHA-256 of the image and mask arrays the run trains on. A run records
    them in its split.json (``write_manifest(..., fingerprints=...)``)."""
    out = {}
    for i, k in zip(dataset.index_of(list(ids)), ids):
        content = hashlib.sha256(np.ascontiguousarray(dataset.images_u8[i]).tobytes())
        content.update(np.ascontiguousarray(dataset.masks[i]).tobytes())
        h, w = (int(v) for v in dataset.original_sizes[i])
        out[k] = [h, w, f"{int(dataset.hashes[i]):016x}", content.hexdigest()[:16]]
    return out


def manifest_fingerprints(path: str | os.PathLike) -> dict[str, list] | None:
    """The fingerprints recorded in a manifest (None: a manifest written without them, or
    an unreadable file)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    found = (
        doc.get("extra", {}).get("fingerprints")
        if isinstance(doc, dict) and isinstance(doc.get("extra"), dict)
        else None
    )
    return found if isinstance(found, dict) else None


def fingerprint_changes(saved: Mapping[str, list], current: Mapping[str, list], limit: int = 5) -> list[str]:
    """What differs between two :func:`image_fingerprints`, one phrase per kind (removed,
    added, resized, other pixels or mask); empty when they agree."""

    def listed(ids: list[str]) -> str:
        return ", ".join(repr(i) for i in ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")

    removed = sorted(set(saved) - set(current))
    added = sorted(set(current) - set(saved))
    common = sorted(set(saved) & set(current))
    resized = [i for i in common if list(saved[i][:2]) != list(current[i][:2])]
    edited = [i for i in common if i not in resized and list(saved[i]) != list(current[i])]
    changes = []
    if removed:
        changes.append(f"{len(removed)} image(s) gone ({listed(removed)})")
    if added:
        changes.append(f"{len(added)} image(s) new ({listed(added)})")
    if resized:
        first = resized[0]
        changes.append(
            f"{len(resized)} image(s) of another size ({listed(resized)}; e.g. {first!r} "
            f"{saved[first][0]}x{saved[first][1]} -> {current[first][0]}x{current[first][1]}, HxW)"
        )
    if edited:
        changes.append(f"{len(edited)} image(s) with other pixels or masks ({listed(edited)})")
    return changes


# --------------------------------------------------------------------------------------
# The split a run applies (its config's rules)
# --------------------------------------------------------------------------------------
def make_split(config: TrainConfig, dataset: Any, lesions_only: bool = False) -> Split:
    """The run's split: a given manifest, the notebook's protocol, or a duplicate-aware one.

    ``dataset``: a :class:`~unet_jax.data.busi.BusiDataset`. Validation always comes out of
    the training data, never out of the test split. ``lesions_only`` (a box-prompted model,
    :func:`unet_jax.train.run.split_for_lesions_only`): the same split as the other models,
    less the normal images.
    """
    split = _make_split(config, dataset)
    return lesion_images_only(split, dataset) if lesions_only else split


def _make_split(config: TrainConfig, dataset: Any) -> Split:
    if config.manifest is not None:
        split = read_manifest(config.manifest)
        dataset.index_of([i for part in split.partitions.values() for i in part])  # all ids present
        return split
    ids, labels = list(dataset.ids), [int(x) for x in dataset.labels]
    if config.classes == "lesion":
        keep = [k for k, lab in enumerate(labels) if lab in (0, 1)]
        ids, labels = [ids[k] for k in keep], [labels[k] for k in keep]
        hashes = dataset.hashes[keep]
    else:
        hashes = dataset.hashes
    if config.split == "seed":
        base = seed_protocol(ids, labels, seed=config.split_seed)
        train_ids = list(base["train"])
        by_id = dict(zip(ids, labels))
        inner = stratified_split(
            train_ids,
            [by_id[i] for i in train_ids],
            (),
            {"train": 1 - config.val_fraction, "val": config.val_fraction},
            seed=config.split_seed,
        )
        return Split(
            "seed",
            config.split_seed,
            {"train": inner["train"], "val": inner["val"], "test": base["test"]},
            {**base.params, "val_fraction_of_train": config.val_fraction},
        )
    groups = duplicate_groups(hashes)
    fractions = {
        "train": 1 - config.val_fraction - config.test_fraction,
        "val": config.val_fraction,
        "test": config.test_fraction,
    }
    return stratified_split(ids, labels, groups, fractions, seed=config.split_seed)


def lesion_images_only(split: Split, dataset: Any) -> Split:
    """``split`` without the normal images of ``dataset`` (benign and malignant only)."""
    label_of = dict(zip(dataset.ids, (int(x) for x in dataset.labels)))
    parts = {name: tuple(i for i in ids if label_of[i] in (0, 1)) for name, ids in split.partitions.items()}
    return Split(split.protocol, split.seed, parts, {**split.params, "lesions_only": True}, split.duplicate_groups)
