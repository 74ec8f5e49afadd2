"""Reader for the public BUSI folder layout.

Layout (one folder per class)::

    ROOT/benign/benign (1).png
    ROOT/benign/benign (1)_mask.png
    ROOT/benign/benign (1)_mask_1.png      # a second lesion: the mask is the union
    ROOT/malignant/...  ROOT/normal/...

An image may also be a single-frame DICOM file, ``benign (1).dcm``, read by
:mod:`unet_jax.data.dicom` (the same 8-bit image a PNG gives); its masks stay PNG
(``benign (1)_mask.png`` beside it). One image per number: ``X.png`` and ``X.dcm`` together
are a problem.

One example per image: the image, the union (logical OR) of all its mask files, its class,
its id (the file stem, e.g. ``"benign (1)"``), its original size and its original mask.
Preprocessing follows the report (sections 2.1.1-2.1.2): resize (default 256x256) and divide
by 255. Masks are binarized at native resolution, united, then resized with bilinear
interpolation and re-thresholded at 0.5 so that they stay in {0, 1}.

Bad input is collected, never ignored: :func:`scan` and :func:`validate` return every
:class:`Problem`; :func:`load_busi` raises one :class:`DatasetError` listing all of them, or,
with ``on_error="skip"``, drops the affected images and reports them in
``BusiDataset.skipped``.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from unet_jax.data.dicom import read_dicom
from unet_jax.data.splits import DUPLICATE_THRESHOLD, check_threshold, duplicate_groups, image_hash

__all__ = [
    "CLASSES",
    "IMAGE_MODES",
    "preprocess_image",
    "BusiDataset",
    "CheckReport",
    "DatasetError",
    "Example",
    "ImageRecord",
    "Layout",
    "Problem",
    "ProgressFn",
    "ReadOptions",
    "check_dataset",
    "load_busi",
    "read_example",
    "mask_problem",
    "read_mask",
    "resolve_root",
    "scan",
    "validate",
]

CLASSES: tuple[str, ...] = ("benign", "malignant", "normal")

# `benign (12).png`, `benign (12)_mask.png`, `benign (12)_mask_1.png`. Numbers have no
# leading zero: `benign (012).png` would otherwise silently share the id of `benign (12).png`.
_NAME = re.compile(
    r"^(?P<cls>[a-z]+) \((?P<num>[1-9]\d*|0)\)"
    r"(?P<mask>_mask(?:_(?P<extra>[1-9]\d*|0))?)?\.(?P<ext>png|dcm)$"
)

# The last chunk of every complete PNG: length 0, type IEND, CRC. PIL decodes a file cut
# inside its final ~20 bytes without complaint (the pixels are all there), so a truncated
# copy is only detectable by this trailer.
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"

# Image modes that are 8 bits per channel; 16-bit or float images would be clipped
# silently by the conversion to 8-bit grayscale/RGB.
IMAGE_MODES = ("1", "L", "LA", "P", "RGB", "RGBA")

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Problem:
    """One offending file (or folder) and why it is rejected."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DatasetError(ValueError):
    """Raised with every problem found, one per line; ``problems`` holds them."""

    def __init__(self, root: str | os.PathLike, problems: Sequence[Problem]):
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in BUSI dataset {str(root)!r}:\n{lines}")


@dataclass(frozen=True)
class ImageRecord:
    """An image file and its mask files, as found on disk (nothing decoded yet)."""

    id: str  # file stem, e.g. "benign (12)"
    class_name: str
    label: int  # index into CLASSES
    number: int  # the N in "benign (N)"
    image_path: Path
    mask_paths: tuple[Path, ...]  # `_mask.png` first, then `_mask_1.png`, `_mask_2.png`, ...


@dataclass(frozen=True)
class Layout:
    """Result of :func:`scan`: the records that look well formed and every naming problem."""

    root: Path
    records: tuple[ImageRecord, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class ReadOptions:
    """How to read and preprocess.

    size: (height, width) to resize to, or None to keep native size (then examples differ in
        shape and cannot be stacked by :func:`load_busi`).
    channels: 1 (grayscale, ITU-R 601 luma, the default) or 3 (RGB as stored, as the notebook).
    keep_original: keep each image's native-resolution union mask (bool, (H0, W0)).
    on_error: "raise" (one DatasetError listing every problem) or "skip" (drop the affected
        images and report them).
    workers: threads for decoding; PNG decoding in PIL releases the GIL.
    all_classes: a missing class folder is a problem (training's default); False: any
        non-empty subset of the class folders is a dataset (e.g. lesion images only, to
        evaluate on), and only a folder holding none of them is a problem.
    """

    size: tuple[int, int] | None = (256, 256)
    channels: int = 1
    keep_original: bool = True
    on_error: Literal["raise", "skip"] = "raise"
    workers: int = 0  # 0: os.cpu_count()
    all_classes: bool = True

    def __post_init__(self) -> None:
        if self.size is not None and (isinstance(self.size, (int, str)) or len(self.size) != 2):
            raise ValueError(f"size must be (height, width) or None, got {self.size!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.size is not None:
            if min(self.size) < 1:
                raise ValueError(f"size must be (height, width) with positive entries, got {self.size}")
            object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))


@dataclass(frozen=True)
class Example:
    """One preprocessed image.

    image: float32 (H, W, C) in [0, 1]; mask: float32 (H, W, 1) in {0, 1};
    image_u8: the same image before /255, uint8 (H, W, C) (exact: image == image_u8 / 255);
    original_size: (H0, W0); original_mask: bool (H0, W0) or None.
    """

    id: str
    class_name: str
    label: int
    image_u8: np.ndarray
    mask: np.ndarray
    original_size: tuple[int, int]
    original_mask: np.ndarray | None
    mask_files: tuple[str, ...]
    hash: int  # perceptual hash of the native grayscale image (splits.image_hash)

    @property
    def image(self) -> np.ndarray:
        return self.image_u8.astype(np.float32) / np.float32(255.0)


@dataclass(frozen=True)
class BusiDataset:
    """Stacked examples, all at one size.

    images_u8: uint8 (N, H, W, C); masks: uint8 (N, H, W, 1) in {0, 1}; labels: int32 (N,);
    original_sizes: int32 (N, 2) as (H0, W0); original_masks: N bool arrays (H0, W0), or empty
    when not kept; hashes: uint64 (N,) perceptual hashes (see splits.image_hash) of the native
    grayscale images. ``images`` gives float32 in [0, 1] (the preprocessing's /255).
    """

    root: str
    ids: tuple[str, ...]
    labels: np.ndarray
    images_u8: np.ndarray
    masks: np.ndarray
    original_sizes: np.ndarray
    original_masks: tuple[np.ndarray, ...]
    mask_files: tuple[tuple[str, ...], ...]
    hashes: np.ndarray
    skipped: tuple[Problem, ...] = ()
    options: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def images(self) -> np.ndarray:
        """float32 (N, H, W, C) in [0, 1]."""
        return self.images_u8.astype(np.float32) / np.float32(255.0)

    @property
    def masks_f32(self) -> np.ndarray:
        """float32 (N, H, W, 1) in {0, 1}."""
        return self.masks.astype(np.float32)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(CLASSES[i] for i in self.labels)

    def class_counts(self) -> dict[str, int]:
        return {c: int(np.sum(self.labels == i)) for i, c in enumerate(CLASSES)}

    def merged_ids(self) -> tuple[str, ...]:
        """Ids of images whose mask is the union of more than one mask file."""
        return tuple(i for i, files in zip(self.ids, self.mask_files) if len(files) > 1)

    def index_of(self, ids: Sequence[str]) -> np.ndarray:
        pos = {k: n for n, k in enumerate(self.ids)}
        missing = [k for k in ids if k not in pos]
        if missing:
            raise ValueError(f"ids not in dataset {self.root!r}: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        return np.asarray([pos[k] for k in ids], dtype=np.int64)

    def subset(self, ids_or_indices: Sequence[str] | np.ndarray) -> BusiDataset:
        """The examples named by ids (str) or integer indices, in that order."""
        seq = list(ids_or_indices)
        idx = self.index_of(seq) if seq and isinstance(seq[0], str) else np.asarray(seq, dtype=np.int64)
        om = tuple(self.original_masks[i] for i in idx) if self.original_masks else ()
        return BusiDataset(
            root=self.root,
            ids=tuple(self.ids[i] for i in idx),
            labels=self.labels[idx],
            images_u8=self.images_u8[idx],
            masks=self.masks[idx],
            original_sizes=self.original_sizes[idx],
            original_masks=om,
            mask_files=tuple(self.mask_files[i] for i in idx),
            hashes=self.hashes[idx],
            skipped=self.skipped,
            options=dict(self.options),
        )


# ---- scanning -------------------------------------------------------------------------
def resolve_root(path: str | os.PathLike) -> Path:
    """The folder holding the class folders: ``path`` itself, or its only child that does.

    Lets ``../shared/data`` stand for ``../shared/data/Dataset_BUSI_with_GT``.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"dataset path {str(root)!r} is not a directory")
    if any((root / c).is_dir() for c in CLASSES):
        return root
    candidates = [d for d in sorted(root.iterdir()) if d.is_dir() and any((d / c).is_dir() for c in CLASSES)]
    return candidates[0] if len(candidates) == 1 else root


def _index_class_folder(
    folder: Path, cls: str, problems: list[Problem]
) -> tuple[dict[int, Path], dict[int, dict[int, Path]]]:
    """A class folder's images by number and masks by number and index (``_mask`` is 0,
    ``_mask_K`` is K); a folder or a file matching no pattern is added to ``problems``."""
    images: dict[int, Path] = {}
    masks: dict[int, dict[int, Path]] = {}
    for entry in sorted(folder.iterdir()):
        m = _NAME.match(entry.name)
        if entry.is_dir():
            problems.append(Problem(str(entry), "unexpected folder inside a class folder"))
        elif m is None:
            problems.append(
                Problem(
                    str(entry),
                    f"file name matches no pattern (expected '{cls} (N).png' (or .dcm) or "
                    f"'{cls} (N)_mask[_K].png', N and K without leading zeros)",
                )
            )
        elif m["cls"] != cls:
            problems.append(Problem(str(entry), f"file of class {m['cls']!r} inside the {cls!r} folder"))
        elif m["mask"] is not None and m["ext"] == "dcm":
            problems.append(Problem(str(entry), "mask is a DICOM file; expected a PNG mask (only images may be DICOM)"))
        elif m["mask"] is None and int(m["num"]) in images:
            problems.append(
                Problem(str(entry), f"a second image for '{cls} ({m['num']})' (besides {images[int(m['num'])].name!r})")
            )
        elif m["mask"] is None:
            images[int(m["num"])] = entry
        else:
            extra = 0 if m["extra"] is None else int(m["extra"])
            masks.setdefault(int(m["num"]), {})[extra] = entry
    return images, masks


def scan(path: str | os.PathLike, all_classes: bool = True) -> Layout:
    """Index the folder by file name only (fast; nothing decoded).

    Problems found here: a missing (unless ``all_classes`` is False: then only when every
    class folder is missing) or empty class folder, a file matching no pattern (or naming
    another class), an image without `_mask.png`, a mask without its image, a `_mask_N.png`
    without the `_mask.png`.
    """
    root = resolve_root(path)
    problems: list[Problem] = []
    records: list[ImageRecord] = []
    if not all_classes and not any((root / c).is_dir() for c in CLASSES):
        problems.append(Problem(str(root), f"no class folder; expected one or more of {', '.join(CLASSES)}"))
    for label, cls in enumerate(CLASSES):
        folder = root / cls
        if not folder.is_dir():
            if all_classes:
                problems.append(Problem(str(folder), "missing class folder"))
            continue
        images, masks = _index_class_folder(folder, cls, problems)
        if not images:
            problems.append(Problem(str(folder), "class folder holds no images"))
        for num in sorted(set(masks) - set(images)):
            for p in masks[num].values():
                problems.append(Problem(str(p), f"mask without its image '{cls} ({num}).png'"))
        for num in sorted(images):
            found = masks.get(num, {})
            if 0 not in found:
                why = (
                    f"missing mask '{cls} ({num})_mask.png'"
                    if not found
                    else f"missing mask '{cls} ({num})_mask.png' (has only "
                    f"{', '.join(sorted(p.name for p in found.values()))})"
                )
                problems.append(Problem(str(images[num]), why))
                continue
            records.append(
                ImageRecord(
                    id=f"{cls} ({num})",
                    class_name=cls,
                    label=label,
                    number=num,
                    image_path=images[num],
                    mask_paths=tuple(found[k] for k in sorted(found)),
                )
            )
    return Layout(root=root, records=tuple(records), problems=tuple(problems))


# ---- decoding -------------------------------------------------------------------------
def _open_dicom(path: Path) -> Image.Image:
    """A single-frame DICOM image as the 8-bit image its PNG would be (:mod:`unet_jax.data.dicom`)."""
    try:
        frames = read_dicom(path).frames
    except ValueError as err:  # its message starts with the path, as a Problem prints it
        raise _DecodeError(Problem(str(path), str(err).removeprefix(f"{path}: "))) from None
    if len(frames) != 1:
        raise _DecodeError(
            Problem(str(path), f"multi-frame DICOM ({len(frames)} frames); expected one image per BUSI entry")
        )
    return frames[0]


def _open(path: Path) -> Image.Image:
    """Read and fully decode one PNG, so that a bad file fails here and not later.

    Problems: unreadable or undecodable bytes; content that is not PNG (e.g. a JPEG renamed
    to .png); a file cut short (no IEND trailer, see ``_PNG_IEND``).
    """
    try:
        data = path.read_bytes()
        if not data:
            raise _DecodeError(Problem(str(path), "unreadable image: empty file (0 bytes)"))
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            fmt = im.format
            out = im.copy() if im.mode != "P" else im.convert("RGBA")
    except _DecodeError:
        raise
    except UnidentifiedImageError as err:  # its message names the BytesIO object: useless
        raise _DecodeError(Problem(str(path), "unreadable image: content is not a recognised image format")) from err
    except Exception as err:  # PIL raises several types for corrupt files
        raise _DecodeError(Problem(str(path), f"unreadable image ({type(err).__name__}: {err})")) from err
    if fmt != "PNG":
        raise _DecodeError(Problem(str(path), f"not a PNG file: its content is {fmt}; expected PNG"))
    # an IEND chunk may legally be followed by junk, so search for it rather than
    # requiring it at the very end
    if data.rfind(_PNG_IEND) < 0:
        raise _DecodeError(
            Problem(str(path), f"truncated PNG: no IEND chunk in its {len(data)} bytes (the file was cut short)")
        )
    return out


class _DecodeError(Exception):
    def __init__(self, problem: Problem):
        super().__init__(str(problem))
        self.problem = problem


def _mask_pixels(im: Image.Image) -> tuple[np.ndarray, int]:
    """A mask image's pixels as (H, W, C) integers and the number of colour channels; with
    an alpha channel (last), a transparent pixel (alpha < 128) is zeroed in every channel."""
    if im.mode == "1":
        return np.asarray(im, dtype=np.uint8)[:, :, None], 1
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA")
    arr = np.asarray(im)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if im.mode in ("LA", "RGBA"):
        arr = np.where(arr[:, :, -1:] >= 128, arr, 0)
        return arr, arr.shape[2] - 1
    return arr, arr.shape[2]


def read_mask(im: Image.Image) -> np.ndarray:
    """Binary mask bool (H, W) from a 1-bit, grayscale, RGB or RGBA PNG.

    A pixel is foreground when any colour channel is non-zero and, with an alpha channel, it
    is not transparent (alpha >= 128). So every binary encoding reads as the same mask: 0/1,
    0/255, 1-bit, or a lesion of any colour on black (a transparent pixel never counts,
    whatever colour it hides). :func:`mask_problem` says whether a mask is binary at all.
    """
    arr, colour = _mask_pixels(im)
    return np.any(arr[:, :, :colour] != 0, axis=2)


def mask_problem(im: Image.Image) -> str | None:
    """Why a decoded mask is not a usable lesion mask, or None.

    Two-level means at most two distinct pixel values (whole pixels: every channel, alpha
    included, a transparent pixel counting as 0), one of them 0. Every mask of the public
    BUSI data is so (1-bit, or 0/255 RGB/RGBA, no anti-aliasing). Problems: more than two
    values (anti-aliased or a photo), or every pixel foreground (an all-255 mask, or two
    non-zero levels).
    """
    arr, colour = _mask_pixels(im)
    flat = arr.reshape(-1, arr.shape[2])
    rest = flat[np.any(flat != flat[0], axis=1)]
    if len(rest) and np.any(rest != rest[0]):
        return (
            "mask is not two-level: more than two distinct pixel values (expected a "
            "binary mask, background 0 and one lesion value, e.g. 0/1 or 0/255)"
        )
    levels = [flat[0]] + ([rest[0]] if len(rest) else [])
    if all(np.any(v[:colour] != 0) for v in levels):
        found = " and ".join(str(v.tolist()) for v in levels)
        return f"mask marks every pixel as lesion (pixel values {found}); expected a lesion on a 0 background"
    return None


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool (H0, W0) -> uint8 (H, W) in {0,1}: bilinear on 0/255 then threshold at half."""
    if mask.shape == size:
        return mask.astype(np.uint8)
    im = Image.fromarray(mask.astype(np.uint8) * np.uint8(255), mode="L")
    out = np.asarray(im.resize((size[1], size[0]), Image.Resampling.BILINEAR))
    return (out >= 128).astype(np.uint8)


def preprocess_image(image: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """The preprocessing of every image, for training and for prediction alike:
    grayscale (ITU-R 601 luma) or RGB, then bilinear resize to ``size`` = (H, W).
    Returns uint8 (H, W, channels); dividing by 255 happens on the device."""
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(size[0], size[1], channels)


def _read(record: ImageRecord, opts: ReadOptions) -> Example:
    image = _open_dicom(record.image_path) if record.image_path.suffix == ".dcm" else _open(record.image_path)
    if image.mode not in IMAGE_MODES:
        raise _DecodeError(
            Problem(
                str(record.image_path), f"unsupported image mode {image.mode!r}; expected 8-bit {'/'.join(IMAGE_MODES)}"
            )
        )
    w0, h0 = image.size
    union = np.zeros((h0, w0), dtype=bool)
    for mp in record.mask_paths:
        m = _open(mp)
        if m.size != image.size:
            raise _DecodeError(
                Problem(str(mp), f"mask size {m.size[0]}x{m.size[1]} (WxH) differs from its image's {w0}x{h0}")
            )
        why = mask_problem(m)
        if why is not None:
            raise _DecodeError(Problem(str(mp), why))
        union |= read_mask(m)
    phash = image_hash(np.asarray(image.convert("L")))
    size = (h0, w0) if opts.size is None else opts.size
    arr = preprocess_image(image, size, opts.channels)
    mask = _resize_mask(union, size)[:, :, None]
    return Example(
        id=record.id,
        class_name=record.class_name,
        label=record.label,
        image_u8=arr,
        mask=mask.astype(np.float32),
        original_size=(h0, w0),
        original_mask=union if opts.keep_original else None,
        mask_files=tuple(p.name for p in record.mask_paths),
        hash=phash,
    )


def read_example(record: ImageRecord, options: ReadOptions = ReadOptions()) -> Example:
    """Decode and preprocess one record; raises DatasetError naming the bad file."""
    try:
        return _read(record, options)
    except _DecodeError as err:
        raise DatasetError(record.image_path.parent.parent, [err.problem]) from None


def _read_all(
    records: Sequence[ImageRecord], opts: ReadOptions, progress: ProgressFn | None
) -> list[Example | Problem]:
    def one(rec: ImageRecord) -> Example | Problem:
        try:
            return _read(rec, opts)
        except _DecodeError as err:
            return err.problem

    workers = opts.workers or os.cpu_count() or 1
    out: list[Example | Problem] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for n, res in enumerate(pool.map(one, records), 1):
            out.append(res)
            if progress is not None:
                progress(n, len(records))
    return out


def validate(path: str | os.PathLike, progress: ProgressFn | None = None) -> list[Problem]:
    """Every problem in the folder: naming (see :func:`scan`), unreadable or truncated PNGs,
    masks whose size differs from their image. Decodes every file."""
    layout = scan(path)
    results = _read_all(layout.records, ReadOptions(size=None, keep_original=False), progress)
    return list(layout.problems) + [r for r in results if isinstance(r, Problem)]


def load_busi(
    path: str | os.PathLike, options: ReadOptions = ReadOptions(), progress: ProgressFn | None = None
) -> BusiDataset:
    """Read a BUSI-layout folder into stacked arrays (see :class:`BusiDataset`).

    Preconditions: ``options.size`` is set (stacking needs one size). Raises DatasetError
    listing every problem unless ``options.on_error == "skip"``; then the images touched by a
    problem are left out and the problems are in ``skipped``. Raises ValueError if no image
    is left.
    """
    if options.size is None:
        raise ValueError(
            "load_busi needs options.size (stacking needs one size); use read_example for native-size images"
        )
    layout = scan(path, options.all_classes)
    results = _read_all(layout.records, options, progress)
    problems = list(layout.problems) + [r for r in results if isinstance(r, Problem)]
    if problems and options.on_error == "raise":
        raise DatasetError(layout.root, problems)
    examples = [r for r in results if isinstance(r, Example)]
    if not examples:
        raise DatasetError(layout.root, problems or [Problem(str(layout.root), "no images")])
    n, (h, w), c = len(examples), options.size, options.channels
    images = np.empty((n, h, w, c), dtype=np.uint8)
    masks = np.empty((n, h, w, 1), dtype=np.uint8)
    for i, ex in enumerate(examples):
        images[i] = ex.image_u8
        masks[i] = ex.mask
    return BusiDataset(
        root=str(layout.root),
        ids=tuple(e.id for e in examples),
        labels=np.asarray([e.label for e in examples], dtype=np.int32),
        images_u8=images,
        masks=masks,
        original_sizes=np.asarray([e.original_size for e in examples], dtype=np.int32),
        original_masks=(tuple(e.original_mask for e in examples) if options.keep_original else ()),
        mask_files=tuple(e.mask_files for e in examples),
        hashes=np.asarray([e.hash for e in examples], dtype=np.uint64),
        skipped=tuple(problems),
        options={"size": list(options.size), "channels": options.channels},
    )


# ---- dataset report (``unet-jax data check``) -------------------------------------------
@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_dataset` found. ``ok`` is False when there is any problem."""

    root: str
    images: dict[str, int]
    mask_files: dict[str, int]
    merged_masks: tuple[str, ...]
    duplicate_groups: tuple[tuple[str, ...], ...]
    duplicate_threshold: int
    sizes: dict[str, list[float]]
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def cross_class_groups(self) -> tuple[tuple[str, ...], ...]:
        return tuple(g for g in self.duplicate_groups if len({x.rsplit(" (", 1)[0] for x in g}) > 1)

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "ok": self.ok,
            "images": self.images,
            "total_images": sum(self.images.values()),
            "mask_files": self.mask_files,
            "merged_masks": list(self.merged_masks),
            "duplicate_threshold": self.duplicate_threshold,
            "duplicate_groups": [list(g) for g in self.duplicate_groups],
            "duplicate_images": sum(len(g) for g in self.duplicate_groups),
            "cross_class_groups": [list(g) for g in self.cross_class_groups],
            "sizes": self.sizes,
            "problems": [{"path": p.path, "reason": p.reason} for p in self.problems],
        }


def check_dataset(
    path: str | os.PathLike, threshold: int | None = None, progress: ProgressFn | None = None
) -> CheckReport:
    """Validate a BUSI-layout folder and summarize it (decodes every file once).

    sizes: min/max/mean native (height, width) over the readable images.
    """
    threshold = DUPLICATE_THRESHOLD if threshold is None else threshold
    check_threshold(threshold)  # before the slow read
    layout = scan(path)
    try:  # a small size: only the hashes, sizes and mask files matter here
        ds = load_busi(layout.root, ReadOptions(size=(16, 16), keep_original=False, on_error="skip"), progress)
    except DatasetError as err:
        return CheckReport(
            str(layout.root), {c: 0 for c in CLASSES}, {c: 0 for c in CLASSES}, (), (), threshold, {}, err.problems
        )
    groups = tuple(tuple(ds.ids[i] for i in g) for g in duplicate_groups(ds.hashes, threshold))
    sizes = ds.original_sizes.astype(np.float64)
    counts = ds.class_counts()
    files = {c: sum(len(f) for f, lab in zip(ds.mask_files, ds.labels) if lab == k) for k, c in enumerate(CLASSES)}
    return CheckReport(
        root=str(layout.root),
        images=counts,
        mask_files=files,
        merged_masks=ds.merged_ids(),
        duplicate_groups=groups,
        duplicate_threshold=threshold,
        sizes={
            "min_hw": sizes.min(0).tolist(),
            "max_hw": sizes.max(0).tolist(),
            "mean_hw": [round(v, 1) for v in sizes.mean(0).tolist()],
        },
        problems=ds.skipped,
    )
