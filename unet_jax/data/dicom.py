"""DICOM images in (pydicom): the 8-bit grayscale or RGB frames the model reads, and the
pixel spacing in mm.

What is read, and how it becomes the same 8-bit image a PNG input gives:

- Photometric interpretations MONOCHROME2 (as stored), MONOCHROME1 (inverted: the stored
  minimum is white, so the 8-bit value is ``255 - v``), RGB, YBR_FULL and YBR_FULL_422
  (converted to RGB by pydicom, ITU-R BT.601 full range). Grayscale frames become PIL mode
  "L", colour frames "RGB": from there :func:`unet_jax.data.busi.preprocess_image` treats
  them exactly as a PNG (RGB -> ITU-R 601 luma for a 1-channel model). Others (PALETTE
  COLOR, YBR_ICT/RCT after decoding...) are refused.
- BitsAllocated 8 or 16. The one scaling rule, for both: the stored range of
  ``BitsStored`` bits is mapped linearly onto 0-255,
  ``v8 = round(v * 255 / (2**BitsStored - 1))`` (signed data first shifted by
  ``2**(BitsStored - 1)``), so 8-bit data is unchanged and a 12-bit 4095 is 255. No window
  (VOI LUT) or rescale (modality LUT) is applied: ultrasound stores display values.
- Multi-frame files (NumberOfFrames > 1, e.g. a cine loop): every frame is returned;
  ``unet-jax predict`` predicts them one by one (outputs ``X_f001_mask.png``, ...).
- Compressed transfer syntaxes are decoded by whichever pydicom decoder is installed
  (pillow: JPEG baseline/extended and JPEG 2000; pydicom: RLE; pyjpegls, which highdicom
  brings: JPEG-LS). A syntax without an installed decoder (e.g. JPEG Lossless, process 14,
  which needs pylibjpeg or GDCM) is refused naming its UID and name.
- Pixel spacing, as (row, column) mm per pixel: from the ultrasound region sequence
  (SequenceOfUltrasoundRegions: PhysicalDeltaY/X of a region whose PhysicalUnitsX/YDirection
  are both 3 = cm, times 10; the largest such region when several), else PixelSpacing
  (mm), else None.

Every problem is a ValueError whose one line names the file.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.errors import InvalidDicomError
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import (
    JPEGBaseline8Bit,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from unet_jax._io import atomic_write

__all__ = [
    "DICOM_SUFFIXES",
    "PHOTOMETRIC_INTERPRETATIONS",
    "DicomImage",
    "is_dicom",
    "pixel_spacing_mm",
    "read_dicom",
    "to_uint8",
    "write_dicom",
]

DICOM_SUFFIXES = (".dcm", ".dicom")
PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422")
_UNITS_CM = 3  # PhysicalUnitsX/YDirection: 3 = cm (PS3.3 C.8.5.5.1.15)


@dataclass(frozen=True)
class DicomImage:
    """One DICOM file read for prediction.

    frames: one 8-bit PIL image per frame, mode "L" (monochrome) or "RGB", all (rows, columns).
    spacing_mm: (row, column) spacing in mm per pixel, or None when the file gives none.
    spacing_source: "ultrasound region" or "PixelSpacing" (None without spacing).
    dataset: the header (for a DICOM SEG that references the image).
    """

    path: Path
    frames: tuple[Image.Image, ...]
    spacing_mm: tuple[float, float] | None
    spacing_source: str | None
    dataset: Dataset


def is_dicom(path: str | os.PathLike) -> bool:
    """A ``.dcm``/``.dicom`` name, or a file with the DICOM preamble marker ("DICM" at byte
    128; scanners often write names without a suffix)."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _region_area(region: Dataset) -> int:
    width = int(region.get("RegionLocationMaxX1", 0)) - int(region.get("RegionLocationMinX0", 0)) + 1
    height = int(region.get("RegionLocationMaxY1", 0)) - int(region.get("RegionLocationMinY0", 0)) + 1
    return max(width, 0) * max(height, 0)


def pixel_spacing_mm(ds: Dataset) -> tuple[tuple[float, float], str] | None:
    """((row mm, column mm), source) from the ultrasound regions in cm, else PixelSpacing."""
    regions = [
        r
        for r in ds.get("SequenceOfUltrasoundRegions", [])
        if r.get("PhysicalUnitsXDirection") == _UNITS_CM
        and r.get("PhysicalUnitsYDirection") == _UNITS_CM
        and float(r.get("PhysicalDeltaX", 0) or 0) != 0
        and float(r.get("PhysicalDeltaY", 0) or 0) != 0
    ]
    if regions:
        region = max(regions, key=_region_area)  # max keeps the first of equal areas
        return (abs(float(region.PhysicalDeltaY)) * 10.0, abs(float(region.PhysicalDeltaX)) * 10.0), "ultrasound region"
    spacing = ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2 and all(float(s) > 0 for s in spacing):
        return (float(spacing[0]), float(spacing[1])), "PixelSpacing"
    return None


def to_uint8(pixels: np.ndarray, bits_stored: int, signed: bool, photometric: str) -> np.ndarray:
    """Stored values -> uint8 by the module's one rule (see the docstring above):
    ``round(v * 255 / (2**bits_stored - 1))``, signed values shifted first, MONOCHROME1
    inverted. Any shape; values outside the stored range are clipped."""
    v = pixels.astype(np.float64)
    if signed:
        v += 2.0 ** (bits_stored - 1)
    v8 = np.clip(np.round(v * 255.0 / (2.0**bits_stored - 1.0)), 0, 255).astype(np.uint8)
    return 255 - v8 if photometric == "MONOCHROME1" else v8


def _open(path: Path) -> Dataset:
    if path.is_dir():
        raise ValueError(f"{path}: is a folder; expected a DICOM file")
    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except InvalidDicomError:
        raise ValueError(
            f"{path}: unreadable DICOM: no 'DICM' file marker (not a DICOM Part 10 file); expected a DICOM image"
        ) from None
    except Exception as err:  # pydicom raises several types for cut or corrupt files
        raise ValueError(f"{path}: unreadable DICOM ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file holds no image (no PixelData element); expected a DICOM image")
    return ds


def _check_header(path: Path, ds: Dataset) -> None:
    """Refuse what the reader does not convert, each with the value and what was expected."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise ValueError(f"{path}: DICOM file has no TransferSyntaxUID in its file meta; expected a DICOM Part 10 file")
    if syntax.is_compressed:
        try:
            available = get_decoder(syntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise ValueError(
                f"{path}: unsupported transfer syntax {syntax} ({syntax.name}): no decoder for it is "
                f"installed; expected uncompressed, RLE, JPEG baseline/extended, JPEG-LS or JPEG 2000"
            )
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in PHOTOMETRIC_INTERPRETATIONS:
        raise ValueError(
            f"{path}: unsupported PhotometricInterpretation {photometric!r}; expected one of "
            f"{', '.join(PHOTOMETRIC_INTERPRETATIONS)}"
        )
    bits = ds.get("BitsAllocated")
    if bits not in (8, 16):
        raise ValueError(f"{path}: unsupported BitsAllocated {bits}; expected 8 or 16")


@contextlib.contextmanager
def _pydicom_quiet() -> Iterator[None]:
    """pydicom's logger off while it decodes: a failing decoder plugin logs its exception
    (an ``ERROR:`` line and a traceback on the console) before pydicom raises the error that
    :func:`read_dicom` reports in one line, with every plugin's message."""
    logger = logging.getLogger("pydicom")  # its modules' loggers inherit this level
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_dicom(path: str | os.PathLike) -> DicomImage:
    """Read and decode one DICOM image (every frame); see the module docstring for the rules.
    Raises ValueError naming the file when it is unreadable or not convertible."""
    path = Path(path)
    ds = _open(path)
    _check_header(path, ds)
    try:
        with _pydicom_quiet():
            pixels = ds.pixel_array  # YBR_FULL(_422) comes back as RGB (pydicom's as_rgb default)
    except Exception as err:  # decoders raise several types on corrupt data
        message = " ".join(str(err).split())  # one line: pydicom lists each plugin's failure on its own
        raise ValueError(f"{path}: unreadable DICOM pixel data ({type(err).__name__}: {message})") from None
    colour = int(ds.get("SamplesPerPixel", 1)) == 3
    frames_n = int(ds.get("NumberOfFrames", 1) or 1)
    if frames_n == 1:
        pixels = pixels[None]
    if pixels.ndim != (4 if colour else 3):
        raise ValueError(
            f"{path}: DICOM pixel data of shape {pixels.shape} does not match SamplesPerPixel "
            f"{ds.get('SamplesPerPixel')}; expected 1 (grayscale) or 3 (colour) samples"
        )
    bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    u8 = to_uint8(pixels, bits_stored, signed, str(ds.PhotometricInterpretation))
    frames = tuple(Image.fromarray(np.ascontiguousarray(f)) for f in u8)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    found = pixel_spacing_mm(ds)
    spacing, source = (None, None) if found is None else found
    return DicomImage(path=path, frames=frames, spacing_mm=spacing, spacing_source=source, dataset=ds)


# ---- writing (test fixtures, the benchmark's PNG -> DICOM conversion) ------------------
def _ybr_422(rgb: np.ndarray) -> bytes:
    """(N, H, W, 3) RGB -> native YBR_FULL_422 bytes: per pair of pixels Y1 Y2 Cb Cr (the
    pair's mean chroma), PS3.5 8.2.1. Needs an even width."""
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float64)
    y = ybr[..., 0].reshape(*ybr.shape[:2], -1, 2)
    chroma = np.round(ybr[..., 1:].reshape(*ybr.shape[:2], -1, 2, 2).mean(axis=3))
    return np.concatenate([y, chroma], axis=-1).astype(np.uint8).tobytes()


def _jpeg_frames(frames: np.ndarray, colour: bool) -> bytes:
    """Each frame as a baseline JPEG (pillow, quality 95; colour as YCbCr 4:2:2), encapsulated."""
    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=95, subsampling=1 if colour else 0)
        out.append(buf.getvalue())
    return encapsulate(out)


def _file_meta(sop_class: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    return meta


def _pixel_module(ds: Dataset, frames: np.ndarray, photometric: str, bits: int, syntax: str) -> None:
    colour = frames.ndim == 4
    ds.Rows, ds.Columns = frames.shape[1:3]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = (16, bits, bits - 1) if bits > 8 else (8, 8, 7)
    ds.PixelRepresentation = 0
    if colour:
        ds.PlanarConfiguration = 0
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    if syntax == JPEGBaseline8Bit:
        ds.PixelData = _jpeg_frames(frames, colour)
    elif photometric == "YBR_FULL_422":
        ds.PixelData = _ybr_422(frames)
    elif photometric == "YBR_FULL":
        ds.PixelData = convert_color_space(frames, "RGB", "YBR_FULL").astype(np.uint8).tobytes()
    else:
        ds.PixelData = frames.astype(np.uint16 if bits > 8 else np.uint8).tobytes()


def write_dicom(
    path: str | os.PathLike,
    frames: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits: int = 8,
    pixel_spacing: tuple[float, float] | None = None,
    region_delta_cm: tuple[float, float] | None = None,
    transfer_syntax: str = pydicom.uid.ExplicitVRLittleEndian,
) -> Path:
    """Write an ultrasound DICOM image (atomically): for tests and for converting PNGs.

    frames: (N, H, W) grayscale or (N, H, W, 3) RGB stored values (N > 1: multi-frame).
    MONOCHROME1 values are written as given (the caller inverts); for YBR_FULL(_422) the RGB
    frames are converted (4:2:2 needs an even width). bits: BitsStored (8 -> 8-bit, 9-16 ->
    16-bit allocated). pixel_spacing: PixelSpacing (row, column) mm; region_delta_cm: one
    ultrasound region over the whole image with PhysicalDeltaY/X (row, column) in cm.
    transfer_syntax: explicit VR little endian, or JPEG baseline (pillow; 8-bit).
    """
    frames = np.asarray(frames)
    multi = len(frames) > 1
    sop_class = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, transfer_syntax)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "US", "anon", "Anon^Test", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "", ""
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "1", 1, 1, "unet_jax test"
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    if region_delta_cm is not None:
        region = Dataset()
        region.RegionSpatialFormat, region.RegionDataType, region.RegionFlags = 1, 1, 0
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = frames.shape[2] - 1, frames.shape[1] - 1
        region.PhysicalUnitsXDirection, region.PhysicalUnitsYDirection = _UNITS_CM, _UNITS_CM
        region.PhysicalDeltaY, region.PhysicalDeltaX = float(region_delta_cm[0]), float(region_delta_cm[1])
        ds.SequenceOfUltrasoundRegions = [region]
    _pixel_module(ds, frames, photometric, bits, transfer_syntax)
    if transfer_syntax == JPEGBaseline8Bit:
        ds.LossyImageCompression = "01"
    return atomic_write(path, lambda tmp: ds.save_as(tmp, enforce_file_format=True))
