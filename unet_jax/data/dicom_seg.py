"""DICOM SEG out (highdicom): a binary segmentation that references its source image, for
viewers that read masks as DICOM (3D Slicer, OHIF, a PACS).

One SEG per source file: segment 1, label "lesion" (SNOMED CT category "Morphologically
abnormal structure", type "Lesion"), algorithm type AUTOMATIC, algorithm "unet_jax" with
the package version. It carries the source's patient and study (StudyInstanceUID) and
references its SOP instance and series; a new series. No pixel spacing is repeated in it
for a 2D source (see :func:`_drop_partial_pixel_measures`); its PatientOrientation is the
source's (empty when the source has none), so that ``dciodvfy`` finds no error. A multi-frame source gets one
segmentation frame per source frame. Empty frames are kept (a frame without lesion is a
result, not a missing one).

highdicom costs about 0.9 s to import: :mod:`unet_jax.predict` imports this module only
for ``--format dicom-seg``.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from unet_jax._io import atomic_write

__all__ = ["ALGORITHM_NAME", "SEGMENT_LABEL", "read_seg_mask", "write_seg"]

ALGORITHM_NAME = "unet_jax"
SEGMENT_LABEL = "lesion"


def _version() -> str:
    """The installed package's version (``unet_jax.__version__`` sits above this layer)."""
    try:
        return metadata.version("unet-jax")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _description() -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME, family=codes.cid7162.ArtificialIntelligence, version=_version()
        ),
    )


def write_seg(source: Dataset, masks: np.ndarray, path: str | os.PathLike) -> Path:
    """Write (atomically) a binary DICOM SEG of ``masks`` bool (frames, rows, columns), one
    per frame of ``source`` (its header, as read), at ``path``. Raises ValueError naming the
    source when highdicom cannot build it (e.g. the source lacks a required attribute)."""
    masks = np.asarray(masks, dtype=bool)
    try:
        seg = hd.seg.Segmentation(
            source_images=[source],
            pixel_array=masks.astype(np.uint8) if len(masks) > 1 else masks[0].astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[_description()],
            series_instance_uid=generate_uid(),
            series_number=int(source.get("SeriesNumber", 0) or 0) + 1000,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer=ALGORITHM_NAME,
            manufacturer_model_name=ALGORITHM_NAME,
            software_versions=_version(),
            device_serial_number="none",
            series_description="unet_jax lesion segmentation",
            omit_empty_frames=False,
        )
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        name = source.filename if isinstance(source.filename, str) else "the source image"
        raise ValueError(f"{name}: cannot build a DICOM SEG for it ({type(err).__name__}: {err})") from None
    _drop_partial_pixel_measures(seg)
    _copy_patient_orientation(source, seg)
    return atomic_write(path, lambda tmp: seg.save_as(tmp))


def _copy_patient_orientation(source: Dataset, seg: Dataset) -> None:
    """PatientOrientation (General Image, Type 2C: required when the SEG has no plane
    orientation, as for a 2D ultrasound source without a Frame of Reference), which
    highdicom 0.28 leaves out: the source's value, or empty (Type 2 allows it). Without it
    ``dciodvfy`` reports the SEG as non-conforming."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PlaneOrientationSequence" in shared or "PatientOrientation" in seg:
        return
    seg.PatientOrientation = source.get("PatientOrientation", "") or ""


def _drop_partial_pixel_measures(seg: Dataset) -> None:
    """For a 2D source without slice thickness (an ultrasound image), highdicom 0.28 writes a
    Pixel Measures item holding PixelSpacing alone, and its own reader (``segread``) then
    refuses the file (SliceThickness required). Such an item is dropped: the SEG references
    its source image, which carries the spacing."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures is not None and "SliceThickness" not in measures[0]:
        del shared.PixelMeasuresSequence


def read_seg_mask(path: str | os.PathLike) -> np.ndarray:
    """The lesion segment of a SEG written by :func:`write_seg`: bool (frames, rows, columns)
    in the source's frame order."""
    seg = hd.seg.segread(path)
    source = seg.get_source_image_uids()[0][2]
    frames = sorted(
        {int(i.ReferencedFrameNumber) for f in seg.PerFrameFunctionalGroupsSequence for i in _frame_refs(f)}
    )
    if not frames:  # a single-frame source: frames are not numbered
        return seg.get_pixels_by_source_instance([source], segment_numbers=[1])[:, :, :, 0].astype(bool)
    return seg.get_pixels_by_source_frame(source, frames, segment_numbers=[1])[:, :, :, 0].astype(bool)


def _frame_refs(frame: Dataset) -> list[Dataset]:
    refs = []
    for derivation in frame.get("DerivationImageSequence", []):
        refs += [r for r in derivation.get("SourceImageSequence", []) if "ReferencedFrameNumber" in r]
    return refs
