"""DICOM decoding on small datasets built here with pydicom: pixel maths, compression, errors."""

from __future__ import annotations

import io
import random
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    MPEG2MPML,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from cxr_batch.pixels import dicom
from cxr_batch.pixels.dicom import decode_dicom, is_dicom
from cxr_batch.errors import DecodeError

LIMIT = 10_000_000
UID = "1.2.826.0.1.3680043.8.498.7"  # fixed: a random UID could contain "12345" by chance


def make_ds(
    pixels: np.ndarray, *, bits_stored: int | None = None, photometric="MONOCHROME2", modality="CR", **extra
) -> Dataset:
    """A minimal valid CR/DX image with file meta and patient identity (which must never leak)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, UID
    ds.Modality, ds.ViewPosition = modality, "PA"
    ds.PatientName, ds.PatientID = "Doe^John", "12345"
    colour = photometric == "RGB"  # RGB arrays are (rows, cols, 3); gray stacks are (frames, rows, cols)
    ds.Rows, ds.Columns = pixels.shape[:2] if colour else pixels.shape[-2:]
    frames = pixels.shape[0] if pixels.ndim == 3 and not colour else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for key, value in extra.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset, **kw) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True, **kw)
    return buf.getvalue()


def ramp(h=16, w=16, hi=255, dtype=np.uint8) -> np.ndarray:
    return np.linspace(0, hi, h * w).round().astype(dtype).reshape(h, w)


def decode(data: bytes):
    return decode_dicom(data, max_pixels=LIMIT)


def refused(data: bytes, *, max_pixels: int = LIMIT) -> str:
    with pytest.raises(DecodeError) as e:
        decode_dicom(data, max_pixels=max_pixels)
    msg = str(e.value)
    assert "\n" not in msg and msg, "the message becomes a one-line error column"
    return msg


# --- pixels ------------------------------------------------------------------------------------


def test_monochrome2_8bit_is_windowed_min_to_max():
    px = ramp(hi=200) + 20  # 20..220: no VOI in the file, so the data's own range maps to 0..1
    gray, meta = decode(to_bytes(make_ds(px)))
    assert gray.dtype == np.float32 and gray.shape == (16, 16)
    assert gray.min() == 0.0 and gray.max() == 1.0
    np.testing.assert_allclose(gray, (px - 20) / 200.0, atol=1e-6)
    assert meta == {
        "modality": "CR", "view_position": "PA", "sop_instance_uid": UID,
        "photometric": "MONOCHROME2", "bits_stored": 8, "width": 16, "height": 16,
    }


def test_monochrome1_16bit_is_inverted_so_bright_raw_is_dark():
    px = ramp(hi=65535, dtype=np.uint16)
    gray, meta = decode(to_bytes(make_ds(px, photometric="MONOCHROME1", modality="DX")))
    assert gray[px == 65535].max() == 0.0  # highest raw value = least attenuation = black
    assert gray[px == 0].min() == 1.0
    assert meta["photometric"] == "MONOCHROME1" and meta["modality"] == "DX"


def test_monochrome1_inverts_after_the_window():
    px = np.array([[0, 100], [3000, 4095]], dtype=np.uint16)
    ds = make_ds(px, bits_stored=12, photometric="MONOCHROME1", WindowCenter=1000, WindowWidth=1001)
    gray, _ = decode(to_bytes(ds))
    # below the window -> 0 -> inverted to white; above -> 1 -> black
    assert gray[0, 0] == 1.0 and gray[1, 1] == 0.0


def window_by_hand(x: float, center: float, width: float) -> float:
    """DICOM PS3.3 C.11.2.1.2.1 (LINEAR) written out, scaled to [0, 1]."""
    if x <= center - 0.5 - (width - 1) / 2:
        return 0.0
    if x > center - 0.5 + (width - 1) / 2:
        return 1.0
    return (x - (center - 0.5)) / (width - 1) + 0.5


def test_12bit_rescale_and_window_match_hand_computation():
    px = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)  # 0..4095, a full 12-bit ramp
    slope, intercept, center, width = 2.0, -100.0, 3000.0, 4001.0
    ds = make_ds(px, bits_stored=12, RescaleSlope=slope, RescaleIntercept=intercept,
                 WindowCenter=center, WindowWidth=width)
    gray, meta = decode(to_bytes(ds))
    assert meta["bits_stored"] == 12
    for raw in (0, 600, 1000, 1500, 2500, 4095):
        expected = window_by_hand(raw * slope + intercept, center, width)
        assert gray.flat[raw] == pytest.approx(expected, abs=1e-5), raw
    assert gray.flat[1000] == pytest.approx(0.225125, abs=1e-5)  # (1900 - 2999.5) / 4000 + 0.5
    assert np.unique(gray).size > 1000  # 2000 raw levels fall inside the window: none lost to 8 bits


def test_12bit_ramp_without_window_keeps_every_level():
    px = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    gray, _ = decode(to_bytes(make_ds(px, bits_stored=12)))
    assert np.unique(gray).size == 4096  # a clip or shift to 8 bits would leave <= 256
    assert gray.flat[0] == 0.0 and gray.flat[4095] == 1.0


def test_multiple_windows_use_the_first():
    px = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    ds = make_ds(px, bits_stored=12, WindowCenter=[1000, 3000], WindowWidth=[1001, 501])
    gray, _ = decode(to_bytes(ds))
    assert gray.flat[1000] == pytest.approx(window_by_hand(1000, 1000, 1001), abs=1e-5)
    assert gray.flat[1499] == pytest.approx(window_by_hand(1499, 1000, 1001), abs=1e-5)


def test_voi_lut_sequence_is_applied_over_its_own_range():
    px = np.array([[0, 1], [2, 3]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    # A 12-bit LUT declared 16-bit, as some CR vendors write it.
    item.LUTData = np.array([0, 1000, 3000, 4000], dtype="<u2").tobytes()
    ds = make_ds(px, bits_stored=12, VOILUTSequence=[item])
    gray, _ = decode(to_bytes(ds))
    np.testing.assert_allclose(gray.ravel(), [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_zero_window_width_falls_back_to_min_max():
    px = ramp(hi=100)
    gray, _ = decode(to_bytes(make_ds(px, WindowCenter=50, WindowWidth=0)))
    assert gray.min() == 0.0 and gray.max() == 1.0


def test_constant_image_is_black_without_dividing_by_zero():
    px = np.full((8, 8), 777, dtype=np.uint16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 would warn
        gray, _ = decode(to_bytes(make_ds(px, bits_stored=12)))
    assert np.all(gray == 0.0)


def test_multi_frame_takes_the_first_frame():
    frames = np.stack([ramp(), 255 - ramp()])
    gray, meta = decode(to_bytes(make_ds(frames)))
    assert gray.shape == (16, 16) and (meta["width"], meta["height"]) == (16, 16)
    np.testing.assert_allclose(gray, ramp() / 255.0, atol=1e-6)


def test_rgb_becomes_luminance():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 1] = (255, 255, 255)
    gray, meta = decode(to_bytes(make_ds(rgb, photometric="RGB")))
    assert gray.shape == (4, 4) and meta["photometric"] == "RGB"
    assert gray[0, 0] == pytest.approx(0.299, abs=1e-3)
    assert gray[1, 1] == pytest.approx(1.0, abs=1e-3) and gray[2, 2] == 0.0


def test_raw_dataset_without_preamble_or_file_meta_decodes():
    ds = make_ds(ramp())
    ds.file_meta = FileMetaDataset()
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)  # no preamble, no file meta
    data = buf.getvalue()
    assert not is_dicom(data[:132])
    gray, _ = decode(data)
    np.testing.assert_allclose(gray, ramp() / 255.0, atol=1e-6)


def test_implicit_little_endian_file_meta_round_trip():
    ds = make_ds(ramp())
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    gray, _ = decode(to_bytes(ds, implicit_vr=True))
    np.testing.assert_allclose(gray, ramp() / 255.0, atol=1e-6)


# --- compressed transfer syntaxes ----------------------------------------------------------------


def smooth_12bit() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:48]
    return (2000 + 1500 * np.sin(x / 7.0) * np.cos(y / 11.0)).astype(np.uint16)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless], ids=["jpeg2000-lossless", "rle-lossless"])
def test_lossless_compression_decodes_to_the_original(syntax):
    px = smooth_12bit()
    plain, _ = decode(to_bytes(make_ds(px, bits_stored=12)))
    ds = make_ds(px, bits_stored=12)
    ds.compress(syntax)  # JPEG 2000 via pylibjpeg-openjpeg, RLE via pydicom's own encoder
    data = to_bytes(ds)
    assert dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    gray, meta = decode(data)
    np.testing.assert_allclose(gray, plain, atol=1e-6)
    assert meta["bits_stored"] == 12


def test_jpeg_baseline_decodes_close_to_the_original():
    px = (smooth_12bit() // 16).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, "JPEG", quality=95)
    ds = make_ds(px)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    gray, _ = decode(to_bytes(ds))
    plain, _ = decode(to_bytes(make_ds(px)))
    assert np.abs(gray - plain).mean() < 0.01  # lossy: close, not equal


def test_jpeg_ls_lossless_matches_uncompressed():
    # pydicom cannot encode JPEG-LS without pyjpegls, so use the pair it ships for its own tests.
    from pydicom import data as pydicom_data

    files = Path(pydicom_data.__file__).parent / "test_files"
    jls, plain = files / "MR_small_jpeg_ls_lossless.dcm", files / "MR_small.dcm"
    if not (jls.exists() and plain.exists()):
        pytest.skip("pydicom's bundled JPEG-LS test file is not installed")
    gray, meta = decode(jls.read_bytes())
    expected, _ = decode(plain.read_bytes())
    np.testing.assert_allclose(gray, expected, atol=1e-6)
    assert meta["modality"] == "MR"


# --- detection and privacy ---------------------------------------------------------------------


def test_is_dicom_finds_files_without_extension(tmp_path):
    path = tmp_path / "IM0001"
    path.write_bytes(to_bytes(make_ds(ramp())))
    assert is_dicom(path.read_bytes()[:132])
    png = io.BytesIO()
    Image.fromarray(ramp()).save(png, "PNG")
    assert not is_dicom(png.getvalue()[:132])
    assert not is_dicom(b"") and not is_dicom(b"\0" * 131)


def test_meta_carries_no_patient_identity():
    ds = make_ds(ramp(), PatientBirthDate="19700101", AccessionNumber="ACC999",
                 InstitutionName="General Hospital")
    _, meta = decode(to_bytes(ds))
    text = repr(meta)
    for leak in ("Doe", "John", "12345", "19700101", "ACC999", "General"):
        assert leak not in text


def test_decode_image_routes_dicom_here():
    from cxr_batch.pixels.decode import decode_image

    out = decode_image(to_bytes(make_ds(ramp())))
    assert out.format == "DICOM" and out.meta["view_position"] == "PA"


# --- errors --------------------------------------------------------------------------------------


def test_empty_bytes():
    assert "empty file" in refused(b"")


def test_random_bytes_are_not_a_dicom():
    noise = random.Random(0).randbytes(4096)
    assert "not a DICOM file" in refused(noise)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns as it reads the damage
def test_garbage_after_the_preamble_is_refused_and_not_called_truncated():
    for seed in range(8):
        msg = refused(b"\0" * 128 + b"DICM" + random.Random(seed).randbytes(600))
        assert msg.startswith("DICOM has no pixel data") and "truncated" not in msg, msg


def element_layout(data: bytes) -> list[tuple[int, int]]:
    """(start of value, end of value) of each dataset element, as pydicom's own parser places them:
    an oracle independent of dicom_layout's walk."""
    ds = dcmread(io.BytesIO(data))
    return [(e.value_tell, e.value_tell + e.length) for e in ds._dict.values() if e.length]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns as it reads the damage
def test_a_file_cut_inside_an_element_reads_as_truncated_and_one_cut_between_elements_does_not():
    data = to_bytes(make_ds(ramp()))
    layout = element_layout(data)
    pixels_at = layout[-1][0]
    for start, end in layout[:-1]:  # every element before the pixel data
        for cut in (start - 3, start + (end - start) // 2):  # inside its header, inside its value
            assert refused(data[:cut]).startswith("truncated DICOM file: it ends inside"), cut
        # Cut exactly between two elements, a file cannot be told from a header-only object: no
        # "copy it again", but never "not an image" either.
        assert refused(data[:end]).startswith("DICOM has no pixel data: a header-only"), end
    for cut in (pixels_at - 5, pixels_at + 3):
        assert refused(data[:cut]).startswith("truncated"), cut
    for cut in (140, 160, 190):  # inside the file meta
        assert refused(data[:cut]).startswith("truncated DICOM file: it ends inside"), cut
    assert refused(data[:132]) == "truncated DICOM file: it ends before its file meta information, before any pixel data; copy it again"


def test_dicom_without_pixel_data():
    ds = make_ds(ramp())
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    assert refused(to_bytes(ds)) == "DICOM has no pixel data (SOP class: Basic Text SR Storage): not an image object"
    cut = to_bytes(ds)[:-3]
    assert refused(cut).startswith("DICOM has no pixel data (SOP class: Basic Text SR Storage): not an image object;"
                                   " the file is also cut short (inside")


def test_image_header_without_pixel_data_is_not_called_truncated():
    """A DICOMDIR's stub images and exports without pixels are whole files: copying them again is no cure."""
    ds = make_ds(ramp())
    del ds.PixelData
    msg = refused(to_bytes(ds))
    assert msg.startswith("DICOM has no pixel data: a header-only Computed Radiography Image Storage object")
    assert "truncated" not in msg and "copy" not in msg


def test_whole_file_whose_pixel_data_is_shorter_than_its_header_says():
    ds = make_ds(ramp(16, 16))
    ds.Rows = 20  # the writer's mistake: 256 bytes of pixels for a 20 x 16 image
    msg = refused(to_bytes(ds))
    assert msg.startswith("pixel data shorter than its header says: 256 of 320 bytes, though no element is cut short")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_codestream_in_a_whole_file_is_not_called_truncated():
    ds = make_ds(smooth_12bit(), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    data = bytearray(to_bytes(ds))
    start, end = element_layout(bytes(data))[-1]
    data[start + 40: start + 200] = random.Random(2).randbytes(160)  # same length: every element still whole
    msg = refused(bytes(data))
    assert msg.startswith("cannot decode pixel data (JPEG 2000 Image Compression (Lossless Only)), though no element is cut")


def test_truncated_pixel_data():
    data = to_bytes(make_ds(ramp(64, 64, hi=4095, dtype=np.uint16), bits_stored=12))
    msg = refused(data[:-1000])
    assert msg.startswith("truncated pixel data") and "8,192 bytes" in msg


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns as it reads the damage
def test_truncated_compressed_pixel_data():
    ds = make_ds(smooth_12bit(), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    data = to_bytes(ds)
    for cut in (8, 100, len(data) // 2):  # inside the end marker, the last fragment, the middle
        assert refused(data[:-cut]).startswith("truncated pixel data"), cut
        assert "the file ends inside element (7FE0,0010)" in refused(data[:-cut]), cut


def test_oversized_image_is_refused_from_the_header_without_allocating():
    ds = make_ds(np.zeros((2, 2), dtype=np.uint16))
    ds.Rows = ds.Columns = 50000  # declares 5 GB of pixels, holds 8 bytes
    data = to_bytes(ds)
    tracemalloc.start()
    try:
        msg = refused(data, max_pixels=100_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert msg.startswith("too many pixels: 50000x50000") and "100,000,000" in msg
    assert peak < 20_000_000


def test_transfer_syntax_without_any_decoder():
    ds = make_ds(ramp())
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\0" * 16])
    ds["PixelData"].VR = "OB"
    msg = refused(to_bytes(ds))
    assert msg.startswith("unsupported DICOM transfer syntax MPEG2")


def test_missing_decoder_plugin_says_what_to_install(monkeypatch):
    class Unavailable:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr(dicom, "get_decoder", lambda ts: Unavailable())
    ds = make_ds(smooth_12bit(), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    msg = refused(to_bytes(ds))
    assert msg == (
        "unsupported DICOM transfer syntax JPEG 2000 Image Compression (Lossless Only):"
        " pip install pylibjpeg pylibjpeg-openjpeg"
    )

