"""pydicom's own corpus of test files (176 files: images in every transfer syntax, DICOMDIR stub
images, reports, RT objects, deliberately damaged files) decoded one by one: every message must be
true to the file. The scoring job's run over the same corpus (one row per file) is in
test_score_contract.py; this file checks the messages without Ray.

The oracle is pydicom's own reading of each file plus a short hand-checked list, never our walk:
- "truncated" / "cut short" appear for exactly the files that are cut (checked by hand: MR_truncated.dcm
  holds 8,130 of its 8,192 pixel bytes; rtplan_truncated.dcm ends 265 bytes into a 976-byte element);
- a DICOM without a Pixel Data element says "DICOM has no pixel data", a header-only image object
  says so, and none of them is sent to be copied again;
- every file with pixel data decodes, except the hand-checked failures below, each with its cause.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from cxr_batch.errors import DecodeError
from cxr_batch.pixels.decode import decode_image
from cxr_batch.pixels.dicom import is_dicom, is_raw_dataset

CORPUS = Path(__import__("pydicom").__file__).parent / "data" / "test_files"

CUT_SHORT = {"MR_truncated.dcm", "rtplan_truncated.dcm"}
# Files with pixel data that must not decode, and the start of the message each must carry.
REFUSED = {
    "MR_truncated.dcm": "truncated pixel data: 8,130 of 8,192 bytes",
    "JPEG-lossy.dcm": "cannot decode pixel data (JPEG Extended (Process 2 and 4)), though no element is cut short",
    "JPEG2000-embedded-sequence-delimiter.dcm": "cannot decode pixel data (JPEG 2000 Image Compression), though",
    "badVR.dcm": "DICOM header has an invalid image size",  # Rows "1A"
    "meta_missing_tsyntax.dcm": "DICOM has pixel data but no Rows/Columns",
    "nested_priv_SQ.dcm": "DICOM has pixel data but no Rows/Columns",
}


def corpus_files() -> list[str]:
    return sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*") if p.is_file())


def message(rel: str) -> str:
    try:
        decode_image((CORPUS / rel).read_bytes(), draft=64)
    except DecodeError as e:
        return str(e)
    return "OK"


def pydicom_view(data: bytes):
    """pydicom's reading of a file it takes for DICOM, or None for other files."""
    if not (is_dicom(data[:132]) or is_raw_dataset(data)):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data), force=True)


@pytest.fixture(scope="module")
def messages() -> dict[str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns as it reads the damaged files
        return {rel: message(rel) for rel in corpus_files()}


def test_the_corpus_is_there(messages):
    assert len(messages) >= 170, f"pydicom's test files moved: {len(messages)} in {CORPUS}"


def test_only_files_that_are_cut_short_are_called_so(messages):
    called_cut = {rel for rel, m in messages.items()
                  if "truncated" in m or "the file is also cut short" in m or "copy it again" in m}
    assert called_cut == CUT_SHORT


def test_dicoms_without_pixel_data_say_so_and_are_not_sent_to_be_copied(messages):
    no_pixels = []
    for rel, msg in messages.items():
        ds = pydicom_view((CORPUS / rel).read_bytes())
        if ds is None or "PixelData" in ds or not (ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")):
            continue
        no_pixels.append(rel)
        assert msg.startswith("DICOM has no pixel data"), (rel, msg)
        if rel not in CUT_SHORT:
            assert "truncated" not in msg and "also cut short" not in msg and "copy" not in msg, (rel, msg)
    # The DICOMDIR series' 54 stub images, UN_sequence.dcm, priv_SQ.dcm and the non-image objects.
    assert len(no_pixels) >= 70, len(no_pixels)
    stubs = [r for r in no_pixels if "/TINY_ALPHA/PT" in r]
    assert len(stubs) >= 50 and all("header-only CT Image Storage object" in messages[r] for r in stubs)
    assert messages["UN_sequence.dcm"].startswith("DICOM has no pixel data: a header-only CT Image Storage object")
    assert messages["dicomdirtests/DICOMDIR"] == (
        "DICOM has no pixel data (SOP class: Media Storage Directory Storage): not an image object")


def test_files_with_pixel_data_decode_or_say_why_not(messages):
    refused = {}
    for rel, msg in messages.items():
        ds = pydicom_view((CORPUS / rel).read_bytes())
        if ds is not None and "PixelData" in ds and msg != "OK":
            refused[rel] = msg
    assert refused.keys() == REFUSED.keys(), refused
    for rel, start in REFUSED.items():
        assert refused[rel].startswith(start), (rel, refused[rel])


def test_files_that_are_no_dicom_are_not_images(messages):
    for rel, msg in messages.items():
        data = (CORPUS / rel).read_bytes()
        if pydicom_view(data) is None:
            assert msg.startswith("not an image"), (rel, msg)
    assert messages["README.txt"].startswith("not an image")
    # A big-endian dataset without a preamble is read as DICOM (it is one: an RT Ion Plan).
    assert messages["ExplVR_BigEndNoMeta.dcm"] == "DICOM has no pixel data (SOP class: RT Ion Plan Storage): not an image object"
    assert messages[os.path.join("dicomdirtests", "77654033", "CR1", "6154")] == "OK"
