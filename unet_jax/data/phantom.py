"""Synthetic breast-ultrasound-like images in the BUSI folder layout.

Each image: layered tissue (smooth, tilted bands), depth attenuation, multiplicative speckle
(Rayleigh-distributed, slightly smoothed, as in B-mode images). Lesions are hypoechoic (dark):
smooth ovals with posterior enhancement for "benign", irregular spiculated shapes with
posterior shadowing for "malignant", none for "normal". Some lesion images get a second
lesion in a ``_mask_1.png``; masks are written in turn as 1-bit, RGB and RGBA PNGs; images as
RGB, like the public files. Optional near-duplicates (a slightly cropped copy, some filed under
the other lesion class) exercise duplicate-aware splits.

Everything is a function of ``seed`` (numpy Generator per image), so two calls write
byte-identical files. The root also holds ``phantom.json`` (the generation parameters, the
multi-mask ids and the duplicate pairs); the BUSI reader only looks inside the class folders,
so it ignores that file, and ``overwrite`` uses it to recognise a folder it may replace.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from unet_jax._io import check_target, new_temp_dir, swap_in

__all__ = ["PhantomInfo", "phantom_image", "write_phantom"]

_MASK_MODES = ("1", "RGB", "RGBA")
_CLASSES = ("benign", "malignant", "normal")
MARKER = "phantom.json"
MARKER_FORMAT = "unet_jax.phantom"
# Below 8 pixels a lesion can cover no pixel at all: a lesion image with an empty mask.
MIN_SIZE = 8


@dataclass(frozen=True)
class PhantomInfo:
    """What :func:`write_phantom` wrote.

    ids: per class, the image ids; multi_mask: ids with more than one mask file;
    duplicates: (original id, copy id) pairs.
    """

    root: Path
    ids: dict[str, tuple[str, ...]]
    multi_mask: tuple[str, ...]
    duplicates: tuple[tuple[str, str], ...]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, radius: float) -> np.ndarray:
    im = Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8), mode="L")
    out = np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    out = out - out.mean()
    return out / (out.std() + 1e-6)


def _tissue(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Echogenicity map in about [0.15, 1], (h, w) float32."""
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32) / h, np.arange(w, dtype=np.float32) / w, indexing="ij")
    tilt = rng.uniform(-0.35, 0.35)
    freq = rng.uniform(4.0, 12.0)
    warp = 0.6 * _smooth_noise(rng, h, w, max(h, w) / 10)
    bands = 0.5 + 0.25 * np.sin(2 * np.pi * freq * (yy + tilt * xx) + warp + rng.uniform(0, 6.3))
    skin = np.exp(-yy / 0.04) * 0.4  # bright skin line at the top
    depth = 1.0 - rng.uniform(0.3, 0.6) * yy  # attenuation with depth
    blobs = 0.15 * _smooth_noise(rng, h, w, max(h, w) / 16)
    return np.clip((bands + blobs) * depth + skin, 0.15, 1.0).astype(np.float32)


def _lesion(
    rng: np.random.Generator, h: int, w: int, malignant: bool, avoid: tuple[float, float] | None = None
) -> np.ndarray:
    """bool (h, w) lesion mask: smooth oval or spiculated star-like shape."""
    for _ in range(20):  # keep a second lesion away from the first
        cy, cx = rng.uniform(0.35, 0.7) * h, rng.uniform(0.25, 0.75) * w
        if avoid is None or np.hypot(cy - avoid[0], cx - avoid[1]) > 0.3 * min(h, w):
            break
    r0 = rng.uniform(0.09, 0.17) * min(h, w)
    aspect = rng.uniform(1.2, 1.8)  # wider than tall
    angle = rng.uniform(-0.4, 0.4)
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / aspect
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    rho, theta = np.hypot(u, v), np.arctan2(v, u)
    radius = np.full_like(theta, r0)
    if malignant:
        for k in range(2, 6):  # irregular outline
            radius += r0 * rng.uniform(0.03, 0.12) * np.cos(k * theta + rng.uniform(0, 6.3))
        n_spikes = int(rng.integers(6, 13))
        phase = rng.uniform(0, 6.3)
        radius += r0 * rng.uniform(0.3, 0.6) * np.maximum(np.cos(n_spikes * theta / 2 + phase), 0.0) ** 8
    return rho <= radius


def phantom_image(
    rng: np.random.Generator, class_name: str, size: tuple[int, int] = (256, 256), multi_mask: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One image and its lesion masks.

    Returns uint8 (H, W) image and a list of bool (H, W) masks: one per lesion (two with
    ``multi_mask``), or one all-zero mask for "normal".
    """
    if class_name not in ("benign", "malignant", "normal"):
        raise ValueError(f"class_name must be benign, malignant or normal, got {class_name!r}")
    h, w = size
    tissue = _tissue(rng, h, w)
    masks: list[np.ndarray] = []
    if class_name != "normal":
        malignant = class_name == "malignant"
        first = _lesion(rng, h, w, malignant)
        masks.append(first)
        if multi_mask:
            ys, xs = np.nonzero(first)
            masks.append(_lesion(rng, h, w, malignant, avoid=(ys.mean(), xs.mean())))
        for m in masks:
            inside = m.astype(np.float32)
            soft = (
                np.asarray(
                    Image.fromarray((inside * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0)),
                    dtype=np.float32,
                )
                / 255.0
            )
            # posterior effect: the columns under the lesion, below it
            cols = inside.max(0).reshape(1, w)
            below = (np.cumsum(inside, axis=0) > 0).astype(np.float32) * (1.0 - inside)
            post = 1.25 if not malignant else 0.55
            tissue = tissue * (1.0 + (post - 1.0) * 0.6 * below * cols)
            tissue = tissue * (1.0 - 0.8 * soft)
    speckle = np.abs(rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w))) / np.sqrt(2)
    speckle = (
        np.asarray(
            Image.fromarray(np.clip(speckle * 100, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6)),
            dtype=np.float32,
        )
        / 100.0
    )
    image = np.clip(tissue * speckle * 170.0, 0, 255).astype(np.uint8)
    if not masks:
        masks.append(np.zeros((h, w), dtype=bool))
    return image, masks


def _save_mask(mask: np.ndarray, path: Path, mode: str) -> None:
    if mode == "1":
        Image.fromarray(mask).convert("1").save(path)
    else:
        gray = mask.astype(np.uint8) * np.uint8(255)
        Image.fromarray(gray, mode="L").convert(mode).save(path)


def _crop_copy(
    image: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A near-duplicate: a few percent cropped off two sides, resized back."""
    h, w = image.shape
    top, left = int(rng.integers(1, max(2, h // 25))), int(rng.integers(1, max(2, w // 25)))
    box = (left, top, w, h)
    img = np.asarray(Image.fromarray(image).crop(box).resize((w, h), Image.Resampling.BILINEAR))
    out = [
        np.asarray(
            Image.fromarray(m.astype(np.uint8) * np.uint8(255)).crop(box).resize((w, h), Image.Resampling.NEAREST)
        )
        >= 128
        for m in masks
    ]
    return img, out


def write_phantom(
    out: str | os.PathLike,
    counts: Mapping[str, int] | None = None,
    size: tuple[int, int] = (256, 256),
    seed: int = 0,
    multi_mask_fraction: float = 0.2,
    duplicates: int = 0,
    overwrite: bool = False,
) -> PhantomInfo:
    """Write a phantom dataset in the BUSI layout to ``out`` (created atomically).

    counts: images per class (default benign 12, malignant 8, normal 4), duplicates
    included; size: (H, W) of every image; duplicates: how many lesion images are near-
    duplicates (a cropped copy) of an earlier one; the last slots of each class, alternately,
    and copies filed under "malignant" are copies of benign images.
    Preconditions (ValueError otherwise): every class count >= 1 (the reader refuses an
    empty class folder), both sides of ``size`` >= 8, ``0 <= multi_mask_fraction <= 1``,
    ``0 <= duplicates`` and no more duplicates than these counts allow; ``out`` does not
    exist, or ``overwrite`` and it is an empty folder or an earlier phantom (never any
    other folder).
    """
    counts = dict(counts or {"benign": 12, "malignant": 8, "normal": 4})
    unknown = sorted(set(counts) - set(_CLASSES))
    if unknown:
        raise ValueError(f"counts has unknown class(es) {unknown}; expected {list(_CLASSES)}")
    for cls in _CLASSES:
        n = counts.get(cls, 0)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(
                f"counts[{cls!r}] must be an integer >= 1 (the reader refuses an empty class folder), got {n!r}"
            )
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise ValueError(
            f"size must be (height, width) with both >= {MIN_SIZE} (smaller lesions can vanish), got {tuple(size)}"
        )
    if not 0.0 <= multi_mask_fraction <= 1.0:
        raise ValueError(f"multi_mask_fraction must be in [0, 1], got {multi_mask_fraction}")
    if duplicates < 0:
        raise ValueError(f"duplicates must be >= 0, got {duplicates}")
    out = Path(out)
    check_target(out, overwrite, _is_phantom, "phantom dataset (no phantom.json found)", _is_phantom_file)
    tmp = new_temp_dir(out)
    try:
        info = _write_into(tmp, counts, (int(size[0]), int(size[1])), seed, multi_mask_fraction, duplicates)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PhantomInfo(out, info.ids, info.multi_mask, info.duplicates)


def _is_phantom_file(rel: Path, is_dir: bool) -> bool:
    """Whether ``rel`` (inside a phantom folder) is one a phantom writes: phantom.json, the
    class folders, and their ``CLASS (N).png`` / ``CLASS (N)_mask[_K].png``."""
    parts = rel.parts
    if len(parts) == 1:
        return is_dir == (parts[0] in _CLASSES) and (is_dir or parts[0] == MARKER)
    pattern = rf"{re.escape(parts[0])} \(\d+\)(_mask(_\d+)?)?\.png"
    return len(parts) == 2 and not is_dir and re.fullmatch(pattern, parts[1]) is not None


def _is_phantom(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == MARKER_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _duplicate_slots(counts: Mapping[str, int], duplicates: int) -> set[tuple[str, int]]:
    """The (class, index) slots that become copies: the last lesion slots of each class,
    alternately."""
    tail = itertools.zip_longest(
        [("benign", n) for n in reversed(range(counts.get("benign", 0)))],
        [("malignant", n) for n in reversed(range(counts.get("malignant", 0)))],
    )
    return set([s for pair in tail for s in pair if s is not None][:duplicates])


def _save_example(folder: Path, id_: str, image: np.ndarray, masks: list[np.ndarray], n_mask: int) -> int:
    """The image (as RGB) and its masks, each mask in the next of the binary encodings;
    returns the count of masks saved so far."""
    Image.fromarray(image, mode="L").convert("RGB").save(folder / f"{id_}.png")
    for k, m in enumerate(masks):
        suffix = "_mask" if k == 0 else f"_mask_{k}"
        _save_mask(m, folder / f"{id_}{suffix}.png", _MASK_MODES[n_mask % 3])
        n_mask += 1
    return n_mask


def _write_into(
    root: Path, counts: Mapping[str, int], size: tuple[int, int], seed: int, multi_mask_fraction: float, duplicates: int
) -> PhantomInfo:
    ids: dict[str, list[str]] = {}
    multi: list[str] = []
    dups: list[tuple[str, str]] = []
    made: list[tuple[str, np.ndarray, list[np.ndarray]]] = []
    n_mask = 0
    dup_slots = _duplicate_slots(counts, duplicates)
    for label, cls in enumerate(("benign", "malignant", "normal")):
        folder = root / cls
        folder.mkdir()
        ids[cls] = []
        for n in range(counts.get(cls, 0)):
            rng = np.random.default_rng([seed, label, n])
            id_ = f"{cls} ({n + 1})"
            # copies under "malignant" come from benign images: the cross-class case
            pool = [m for m in made if m[0].startswith("benign")] if cls == "malignant" else made
            if (cls, n) in dup_slots and pool:
                src_id, src_img, src_masks = pool[int(rng.integers(len(pool)))]
                image, masks = _crop_copy(src_img, src_masks, rng)
                dups.append((src_id, id_))
            else:
                multi_here = cls != "normal" and rng.random() < multi_mask_fraction
                image, masks = phantom_image(rng, cls, size, multi_mask=multi_here)
                if cls != "normal":
                    made.append((id_, image, masks))
            if len(masks) > 1:
                multi.append(id_)
            n_mask = _save_example(folder, id_, image, masks, n_mask)
            ids[cls].append(id_)
    if len(dups) != duplicates:
        # a copy needs an earlier lesion image of a suitable class (see dup_slots)
        raise ValueError(
            f"duplicates={duplicates} is more than these counts allow "
            f"({len(dups)}: {dict(counts)}); lower it or raise the counts"
        )
    (root / MARKER).write_text(
        json.dumps(
            {
                "format": MARKER_FORMAT,
                "seed": seed,
                "counts": {k: int(v) for k, v in counts.items()},
                "size": list(size),
                "multi_mask_fraction": multi_mask_fraction,
                "duplicates": duplicates,
                "multi_mask": multi,
                "duplicate_pairs": dups,
            },
            indent=1,
        )
    )
    return PhantomInfo(root, {k: tuple(v) for k, v in ids.items()}, tuple(multi), tuple(dups))
