"""The DICOM reader (unet_jax.data.dicom): each photometric interpretation and bit depth
becomes the 8-bit image a PNG of the same picture gives; multi-frame files; compressed
syntaxes decoded or refused by name; spacing from the ultrasound regions or PixelSpacing;
bad files refused in one line naming them. Every file is built here with pydicom."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import convert_color_space
from pydicom.uid import MPEG2MPML, JPEGBaseline8Bit

from unet_jax.data.busi import preprocess_image
from unet_jax.data.dicom import is_dicom, pixel_spacing_mm, read_dicom, to_uint8, write_dicom

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (1, 32, 40), dtype=np.uint8)
# Chroma constant over each horizontal pixel pair: 4:2:2 subsampling loses nothing of it.
RGB = np.repeat(RNG.integers(0, 256, (1, 32, 20, 3), dtype=np.uint8), 2, axis=2)


def _pixels(path) -> np.ndarray:
    (frame,) = read_dicom(path).frames
    return np.asarray(frame)


def test_monochrome2_is_read_as_stored_and_monochrome1_inverted(tmp_path):
    m2 = write_dicom(tmp_path / "m2.dcm", GRAY)
    m1 = write_dicom(tmp_path / "m1.dcm", 255 - GRAY, photometric="MONOCHROME1")
    assert read_dicom(m2).frames[0].mode == "L" and np.array_equal(_pixels(m2), GRAY[0])
    assert np.array_equal(_pixels(m1), GRAY[0])  # stored 255 - v displays as v


def test_rgb_is_preprocessed_exactly_as_the_same_png(tmp_path):
    dcm = write_dicom(tmp_path / "rgb.dcm", RGB, photometric="RGB")
    Image.fromarray(RGB[0]).save(tmp_path / "rgb.png")
    with Image.open(tmp_path / "rgb.png") as png:
        for channels in (1, 3):  # 1: the same ITU-R 601 luma as a PNG
            expected = preprocess_image(png, (16, 24), channels)
            assert np.array_equal(preprocess_image(read_dicom(dcm).frames[0], (16, 24), channels), expected)


@pytest.mark.parametrize("photometric", ["YBR_FULL", "YBR_FULL_422"])
def test_ybr_is_converted_to_rgb(tmp_path, photometric):
    dcm = write_dicom(tmp_path / "ybr.dcm", RGB, photometric=photometric)
    assert pydicom.dcmread(dcm).PhotometricInterpretation == photometric
    image = read_dicom(dcm).frames[0]
    # the RGB -> YBR -> RGB round trip rounds to 8 bits twice: at most 1 off
    assert image.mode == "RGB" and np.abs(np.asarray(image, np.int16) - RGB[0]).max() <= 1


def test_the_scaling_rule_literal_values():
    stored = np.array([0, 1, 2048, 4095])
    assert to_uint8(stored, 12, False, "MONOCHROME2").tolist() == [0, 0, 128, 255]  # round(v * 255 / 4095)
    assert to_uint8(stored, 12, False, "MONOCHROME1").tolist() == [255, 255, 127, 0]
    assert to_uint8(np.array([0, 128, 255]), 8, False, "MONOCHROME2").tolist() == [0, 128, 255]  # 8-bit: unchanged
    assert to_uint8(np.array([-32768, 0, 32767]), 16, True, "MONOCHROME2").tolist() == [0, 128, 255]


def test_16_bit_data_is_scaled_by_its_stored_bits(tmp_path):
    stored = (GRAY.astype(np.int64) * 4095 // 255).astype(np.uint16)
    dcm = write_dicom(tmp_path / "b12.dcm", stored, bits=12)
    ds = pydicom.dcmread(dcm)
    assert (ds.BitsAllocated, ds.BitsStored) == (16, 12)
    expected = np.round(stored[0].astype(np.float64) * 255 / 4095).astype(np.uint8)
    assert np.array_equal(_pixels(dcm), expected) and np.array_equal(expected, GRAY[0])


def test_every_frame_of_a_multi_frame_file_is_read(tmp_path):
    frames = np.stack([GRAY[0], GRAY[0][:, ::-1], 255 - GRAY[0]])
    image = read_dicom(write_dicom(tmp_path / "cine.dcm", frames))
    assert len(image.frames) == 3
    for got, want in zip(image.frames, frames, strict=True):
        assert np.array_equal(np.asarray(got), want)


def test_jpeg_baseline_is_decoded_by_pillow(tmp_path):
    smooth = np.stack([*np.meshgrid(np.linspace(0, 255, 40), np.linspace(0, 255, 32)), np.full((32, 40), 90.0)], -1)
    smooth = smooth.astype(np.uint8)[None]
    dcm = write_dicom(tmp_path / "jpeg.dcm", smooth, photometric="YBR_FULL_422", transfer_syntax=JPEGBaseline8Bit)
    ds = pydicom.dcmread(dcm)
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    (jpeg,) = generate_frames(ds.PixelData, number_of_frames=1)
    with Image.open(io.BytesIO(jpeg)) as im:  # pillow's YCbCr, then the standard's YBR_FULL -> RGB
        im.draft("YCbCr", im.size)
        assert np.array_equal(_pixels(dcm), convert_color_space(np.asarray(im), "YBR_FULL", "RGB"))
    assert np.abs(_pixels(dcm).astype(np.int16) - smooth[0]).mean() < 2  # and it is the picture


def test_a_syntax_without_decoder_is_refused_by_uid_and_name(tmp_path):
    ds = pydicom.dcmread(write_dicom(tmp_path / "plain.dcm", GRAY))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # pydicom has no decoder for video syntaxes
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ValueError) as err:
        read_dicom(path)
    message = str(err.value)
    assert message.startswith(f"{path}: unsupported transfer syntax {MPEG2MPML} ({MPEG2MPML.name})")
    assert "\n" not in message


def test_unreadable_files_are_refused_in_one_line(tmp_path):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not a dicom file at all" * 10)
    cut = tmp_path / "cut.dcm"
    data = write_dicom(tmp_path / "whole.dcm", GRAY).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    no_pixels = tmp_path / "nopixels.dcm"
    ds = pydicom.dcmread(tmp_path / "whole.dcm")
    del ds.PixelData
    ds.save_as(no_pixels)
    for path, words in [
        (garbage, "unreadable DICOM"),
        (cut, "unreadable DICOM"),
        (no_pixels, "holds no image"),
        (tmp_path / "missing.dcm", "no such file"),
    ]:
        with pytest.raises(ValueError) as err:
            read_dicom(path)
        assert str(err.value).startswith(f"{path}: ") and words in str(err.value) and "\n" not in str(err.value)


def test_an_unsupported_photometric_interpretation_is_refused(tmp_path):
    ds = pydicom.dcmread(write_dicom(tmp_path / "x.dcm", GRAY))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(tmp_path / "palette.dcm")
    with pytest.raises(ValueError, match=r"unsupported PhotometricInterpretation 'PALETTE COLOR'; expected one of"):
        read_dicom(tmp_path / "palette.dcm")


def test_spacing_from_the_ultrasound_region_in_cm_else_pixel_spacing(tmp_path):
    region = read_dicom(write_dicom(tmp_path / "r.dcm", GRAY, region_delta_cm=(0.0125, 0.02)))
    assert region.spacing_mm == pytest.approx((0.125, 0.2)) and region.spacing_source == "ultrasound region"
    both = read_dicom(write_dicom(tmp_path / "b.dcm", GRAY, pixel_spacing=(0.3, 0.4), region_delta_cm=(0.01, 0.01)))
    assert both.spacing_mm == pytest.approx((0.1, 0.1))  # the region wins
    plain = read_dicom(write_dicom(tmp_path / "p.dcm", GRAY, pixel_spacing=(0.3, 0.4)))
    assert plain.spacing_mm == pytest.approx((0.3, 0.4)) and plain.spacing_source == "PixelSpacing"
    assert read_dicom(write_dicom(tmp_path / "n.dcm", GRAY)).spacing_mm is None
    ds = pydicom.dcmread(tmp_path / "b.dcm")
    ds.SequenceOfUltrasoundRegions[0].PhysicalUnitsXDirection = 0  # "none": not a length
    assert pixel_spacing_mm(ds) == (pytest.approx((0.3, 0.4)), "PixelSpacing")


def test_dicom_files_are_recognised_by_name_or_marker(tmp_path):
    no_suffix = tmp_path / "IM0001"
    no_suffix.write_bytes(write_dicom(tmp_path / "a.dcm", GRAY).read_bytes())
    Image.fromarray(GRAY[0]).save(tmp_path / "a.png")
    assert is_dicom(no_suffix) and is_dicom(tmp_path / "a.dcm") and not is_dicom(tmp_path / "a.png")
    assert np.array_equal(_pixels(no_suffix), GRAY[0])
