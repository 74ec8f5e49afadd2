"""DICOM through `unet-jax predict` and `evaluate`: the same masks as the PNG of the same
picture, area_mm2 = area_px x row spacing x column spacing, multi-frame files frame by
frame, DICOM SEG out (read back with highdicom, equal to the PNG mask), and the refusals
(non-DICOM inputs to --format dicom-seg, an unreadable DICOM) in one line naming the file."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from _train_helpers import save_untrained_run
from PIL import Image

from unet_jax import __version__
from unet_jax.cli import main
from unet_jax.data import write_phantom
from unet_jax.data.dicom import write_dicom
from unet_jax.data.dicom_seg import read_seg_mask

SPACING = (0.125, 0.25)  # mm per pixel (row, column): one pixel is 1/32 mm^2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return save_untrained_run(tmp_path_factory.mktemp("predict_dicom") / "run")


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two phantom pictures (8-bit grayscale, 40x48) as PNG, and the first as DICOM."""
    root = tmp_path_factory.mktemp("dicom_inputs")
    write_phantom(root / "busi", counts={"benign": 2, "malignant": 1, "normal": 1}, size=(40, 48), seed=3)
    pixels = [np.asarray(Image.open(root / "busi" / "benign" / f"benign ({n}).png").convert("L")) for n in (1, 2)]
    for n, p in enumerate(pixels, start=1):
        Image.fromarray(p).save(root / f"us{n}.png")
    write_dicom(root / "us1.dcm", pixels[0][None], pixel_spacing=SPACING)
    return root, pixels


@pytest.fixture(scope="module")
def threshold(run, pictures, tmp_path_factory):
    """The median of the untrained model's probabilities on us1: a mask of about half the
    pixels, so that areas and masks are not trivially empty or full."""
    out = tmp_path_factory.mktemp("probe")
    root, _ = pictures
    args = ["predict", "--checkpoint", str(run), "--raw", "--save-probabilities", "npy"]
    assert main([*args, str(root / "us1.png"), "--out", str(out)]) == 0
    return float(np.median(np.load(out / "us1_prob.npy")))


def _predict(run, threshold, inputs, out, *extra) -> int:
    args = ["predict", "--checkpoint", str(run), "--raw", "--threshold", f"{threshold!r}", *extra]
    return main([*args, *map(str, inputs), "--out", str(out)])


def _rows(out: Path) -> list[dict]:
    return json.loads((out / "predictions.json").read_text())


def _mask(path) -> np.ndarray:
    return np.asarray(Image.open(path)) > 0


def test_a_dicom_gives_the_png_mask_and_its_area_in_mm2(run, threshold, pictures, tmp_path):
    root, _ = pictures
    assert _predict(run, threshold, [root / "us1.png"], tmp_path / "png") == 0
    assert _predict(run, threshold, [root / "us1.dcm"], tmp_path / "dcm") == 0
    png_mask, dcm_mask = _mask(tmp_path / "png" / "us1_mask.png"), _mask(tmp_path / "dcm" / "us1_mask.png")
    assert np.array_equal(png_mask, dcm_mask) and 0 < png_mask.sum() < png_mask.size
    (png_row,), (dcm_row,) = _rows(tmp_path / "png"), _rows(tmp_path / "dcm")
    assert png_row["area_mm2"] is None and png_row["frame"] is None
    assert dcm_row["area_px"] == int(dcm_mask.sum())
    assert dcm_row["area_mm2"] == pytest.approx(dcm_mask.sum() / 32)  # 0.125 mm x 0.25 mm per pixel
    with open(tmp_path / "dcm" / "predictions.csv", newline="") as f:
        (row,) = csv.DictReader(f)
    assert float(row["area_mm2"]) == pytest.approx(dcm_mask.sum() / 32)


def test_a_multi_frame_file_is_predicted_frame_by_frame(run, threshold, pictures, tmp_path, capsys):
    root, pixels = pictures
    cine = write_dicom(tmp_path / "cine.dcm", np.stack(pixels), region_delta_cm=(0.0125, 0.025))
    assert _predict(run, threshold, [root / "us1.png", root / "us2.png"], tmp_path / "png") == 0
    assert _predict(run, threshold, [cine], tmp_path / "cine") == 0
    assert "[1/1] " in capsys.readouterr().out
    rows = _rows(tmp_path / "cine")
    assert [r["frame"] for r in rows] == [1, 2] and all(r["input"] == str(cine) for r in rows)
    for n in (1, 2):
        mask = _mask(tmp_path / "cine" / f"cine_f00{n}_mask.png")
        assert np.array_equal(mask, _mask(tmp_path / "png" / f"us{n}_mask.png"))
        assert rows[n - 1]["mask"] == str(tmp_path / "cine" / f"cine_f00{n}_mask.png")
        assert rows[n - 1]["area_mm2"] == pytest.approx(mask.sum() / 32)  # the region's 0.0125 cm x 0.025 cm


def test_dicom_seg_references_its_source_and_holds_the_png_mask(run, threshold, pictures, tmp_path):
    root, _ = pictures
    out = tmp_path / "seg"
    assert _predict(run, threshold, [root / "us1.dcm"], out, "--format", "dicom-seg") == 0
    (row,) = _rows(out)
    assert row["seg"] == str(out / "us1_seg.dcm")
    mask = _mask(out / "us1_mask.png")
    assert 0 < mask.sum() < mask.size
    assert np.array_equal(read_seg_mask(out / "us1_seg.dcm"), mask[None])  # pixel for pixel
    seg = hd.seg.segread(out / "us1_seg.dcm")
    source = hd.imread(root / "us1.dcm")
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.get_source_image_uids() == [(source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)]
    (segment,) = seg.SegmentSequence
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (segment.SegmentLabel, segment.SegmentAlgorithmType) == ("lesion", "AUTOMATIC")
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("unet_jax", __version__)
    assert seg.SegmentationType == "BINARY"
    _check_conforms(out / "us1_seg.dcm")


def _check_conforms(path: Path) -> None:
    """dciodvfy (Debian's dicom3tools; .ci/run installs it) finds no error in the file. It is
    required: the test fails, never skips, without it."""
    tool = shutil.which("dciodvfy")
    assert tool is not None, "dciodvfy is missing: apt-get install -y dicom3tools (as .ci/run does)"
    report = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


@pytest.mark.parametrize("orientation", [None, ["A", "F"]])
def test_the_seg_passes_dciodvfy_with_the_sources_patient_orientation(pictures, tmp_path, orientation):
    from unet_jax.data.dicom_seg import write_seg

    _, pixels = pictures
    source = write_dicom(tmp_path / "src.dcm", pixels[0][None], pixel_spacing=SPACING)
    ds = pydicom.dcmread(source)
    if orientation is not None:
        ds.PatientOrientation = orientation
        ds.save_as(source)
        ds = pydicom.dcmread(source)
    seg = write_seg(ds, pixels[0][None] > 100, tmp_path / "seg.dcm")
    _check_conforms(seg)
    assert list(pydicom.dcmread(seg).PatientOrientation or []) == (orientation or [])


def test_dicom_seg_refuses_a_png_input_before_writing_anything(run, pictures, tmp_path, capsys):
    root, _ = pictures
    out = tmp_path / "out"
    inputs = [str(root / "us1.dcm"), str(root / "us1.png")]
    assert main(["predict", "--checkpoint", str(run), *inputs, "--out", str(out), "--format", "dicom-seg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"unet-jax predict: error: {root / 'us1.png'}: not a DICOM file") and err.count("\n") == 1
    assert not out.exists()


def test_dicom_seg_of_a_multi_frame_file_is_refused_for_that_file(run, threshold, pictures, tmp_path, capsys):
    root, pixels = pictures
    cine = write_dicom(tmp_path / "cine.dcm", np.stack(pixels))
    out = tmp_path / "out"
    assert _predict(run, threshold, [cine, root / "us1.dcm"], out, "--format", "dicom-seg") == 1
    assert f"skipped: {cine}: multi-frame DICOM (2 frames)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "predictions.csv",
        "predictions.json",
        "report.html",
        "us1_mask.png",
        "us1_overlay.png",
        "us1_seg.dcm",
    ]


def test_an_unreadable_dicom_is_skipped_in_one_line_naming_it(run, threshold, pictures, tmp_path, capsys):
    root, _ = pictures
    bad = tmp_path / "bad.dcm"
    data = (root / "us1.dcm").read_bytes()
    bad.write_bytes(data[: len(data) - 500])  # cut inside its pixel data
    out = tmp_path / "out"
    assert _predict(run, threshold, [bad, root / "us1.dcm"], out) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if str(bad) in line]
    assert len(lines) == 1 and lines[0].startswith(f"[1/2] skipped: {bad}: unreadable DICOM")
    assert not any(p.name.startswith("bad") for p in out.iterdir())
    assert [r["error"] is None for r in _rows(out)] == [False, True]


def test_evaluate_reads_dicom_images_with_png_masks(run, tmp_path, capsys):
    png = tmp_path / "png"
    write_phantom(png, counts={"benign": 2, "malignant": 1, "normal": 1}, size=(32, 40), seed=4)
    dcm = tmp_path / "dcm"
    shutil.copytree(png, dcm)
    for image in sorted(dcm.glob("*/* (?).png")):  # the images, not their masks
        write_dicom(image.with_suffix(".dcm"), np.asarray(Image.open(image).convert("L"))[None])
        image.unlink()
    assert len(list(dcm.glob("*/*.dcm"))) == 4

    def report(data) -> dict:
        assert main(["evaluate", "--checkpoint", str(run), "--data", str(data), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    png_report, dcm_report = report(png), report(dcm)
    png_report.pop("source"), dcm_report.pop("source")
    assert dcm_report == png_report

    shutil.copy(png / "benign" / "benign (1).png", dcm / "benign" / "benign (1).png")  # two images for one entry
    assert main(["evaluate", "--checkpoint", str(run), "--data", str(dcm), "--json"]) == 2
    assert "a second image for 'benign (1)'" in capsys.readouterr().err


def test_a_source_without_study_uid_leaves_no_files_behind(run, threshold, pictures, tmp_path, capsys):
    root, _ = pictures
    ds = pydicom.dcmread(root / "us1.dcm")
    del ds.StudyInstanceUID  # highdicom needs it to build the SEG, after the PNGs were written
    bad = tmp_path / "nostudy.dcm"
    ds.save_as(bad)
    out = tmp_path / "out"
    assert _predict(run, threshold, [bad, root / "us1.dcm"], out, "--format", "dicom-seg") == 1
    err = capsys.readouterr().err
    assert f"[1/2] skipped: {bad}: cannot build a DICOM SEG for it" in err
    assert not any(p.name.startswith("nostudy") for p in out.iterdir())
    assert [r["error"] is None for r in _rows(out)] == [False, True]


def _lying_jpeg(path: Path, pixels: np.ndarray) -> Path:
    """A JPEG-baseline DICOM whose JPEG stream is cut: its header promises more than it holds."""
    from pydicom.encaps import encapsulate, generate_frames
    from pydicom.uid import JPEGBaseline8Bit

    write_dicom(path, pixels[None], transfer_syntax=JPEGBaseline8Bit)
    ds = pydicom.dcmread(path)
    (jpeg,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([jpeg[: len(jpeg) // 2]])
    ds.save_as(path)
    return path


def test_a_lying_jpeg_is_one_clean_line_and_counts_agree(run, threshold, pictures, tmp_path, capfd, caplog):
    root, pixels = pictures
    cine = write_dicom(tmp_path / "cine.dcm", np.stack([pixels[0], pixels[1], pixels[0]]))  # 3 frames
    bad = _lying_jpeg(tmp_path / "lying.dcm", pixels[0])
    with caplog.at_level(logging.DEBUG):
        assert _predict(run, threshold, [cine, bad, root / "us1.png"], tmp_path / "out") == 1
    out, err = capfd.readouterr()
    assert "ERROR" not in err and "Traceback" not in err, err
    assert not [r for r in caplog.records if r.name.startswith("pydicom")]  # nothing from pydicom's own logger
    (line,) = [line for line in err.splitlines() if str(bad) in line]
    assert line.startswith(f"[2/3] skipped: {bad}: unreadable DICOM pixel data") and "pillow: " in line
    assert [line[:5] for line in out.splitlines() if line.startswith("[")] == ["[1/3]"] * 3 + ["[3/3]"]
    assert "1 of 3 input(s) could not be read" in err  # inputs, as the progress counts them (5 rows)
    assert len(_rows(tmp_path / "out")) == 5
